"""Capability retention: lm-evaluation-harness scores of a policy, added to its run record.

Standard harness tasks work online (or from a pre-staged HF cache); offline, the project's own
local tasks run anywhere. They are generated deterministically from the NRC lexicon into the
cache, as YAML with absolute data paths (lm-eval resolves relative ``data_files`` against the CWD):

* ``bench_polarity``: which of two words is positive (multiple choice);
* ``bench_emotion_word``: which emotion a word expresses, among joy, fear, anger, sadness.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from bench.core.artifacts import cache_dir
from tasks.lexicon.rewards import nrc_lexicon

LOCAL_TASKS = ("bench_polarity", "bench_emotion_word")
EMOTIONS = ("joy", "fear", "anger", "sadness")
VERSION = 1


def _items() -> dict[str, list[dict]]:
    lex = nrc_lexicon()
    rng = random.Random(VERSION)
    pos = sorted(w for w, c in lex.items() if "positive" in c and "negative" not in c and w.isalpha())
    neg = sorted(w for w, c in lex.items() if "negative" in c and "positive" not in c and w.isalpha())
    polarity = []
    for _ in range(120):
        good, bad = rng.choice(pos), rng.choice(neg)
        first = rng.random() < 0.5
        polarity.append(
            {
                "question": f"Which word is more positive: {good if first else bad} or "
                f"{bad if first else good}?",
                "choices": [good, bad] if first else [bad, good],
                "label": 0 if first else 1,
            }
        )
    single = sorted(
        (w, next(iter(set(c) & set(EMOTIONS))))
        for w, c in lex.items()
        if len(set(c) & set(EMOTIONS)) == 1 and w.isalpha()
    )
    emotion = [
        {"question": f"The word '{w}' expresses", "choices": list(EMOTIONS), "label": EMOTIONS.index(e)}
        for w, e in rng.sample(single, 120)
    ]
    return {"bench_polarity": polarity, "bench_emotion_word": emotion}


def local_task_dir() -> Path:
    """The generated task folder (YAML + JSONL), built once per version."""
    folder = cache_dir() / f"lmeval-tasks-v{VERSION}"
    if (folder / "DONE").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in _items().items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(i) + "\n" for i in items))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}\\nAnswer:"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n'
            "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
            f"metadata: {{version: {VERSION}}}\n"
        )
    (folder / "DONE").write_text("ok\n")
    return folder


def lmeval_scores(model, tok, task_names: list[str], limit: int | None = None, batch_size: int = 16) -> dict:
    """``{"task/metric": value}`` from lm-eval on an in-memory model (HFLM)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tok, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=str(local_task_dir()))
    unknown = [t for t in task_names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; local ones: {', '.join(LOCAL_TASKS)}")
    with torch.no_grad():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(task_names),
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    scores = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and "," in key and "stderr" not in key:
                scores[f"{task}/{key.split(',')[0]}"] = float(value)
    return scores
