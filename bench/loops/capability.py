"""Capability retention: lm-evaluation-harness scores of a policy, added to its run record.

Standard harness tasks work online (or from a pre-staged HF cache); offline, the project's own
local tasks run anywhere. They are generated deterministically from the NRC lexicon into the
cache, as YAML with absolute data paths (lm-eval resolves relative ``data_files`` against the CWD):

* ``bench_polarity``: which of two words is positive (multiple choice);
* ``bench_emotion_word``: which emotion a word expresses, among joy, fear, anger, sadness.

Like the Open LLM Leaderboard (v2), a chat model (its tokenizer has a chat template) is scored on
chat-formatted prompts with its few-shot examples as turns, at the tasks' own shot counts; the
records say, per task, whether the template was applied (``TASK/chat_template``). Some harness tasks
import packages lm-eval itself does not require (``TASK_MODULES``): they are checked before
anything runs, and the project extra ``leaderboard`` installs them.
"""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import torch

from bench.core.artifacts import cache_dir
from bench.loops.config import ConfigError
from tasks.lexicon.rewards import nrc_lexicon

LOCAL_TASKS = ("bench_polarity", "bench_emotion_word")
EMOTIONS = ("joy", "fear", "anger", "sadness")
VERSION = 1

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "pip install -c constraints.txt -e '.[leaderboard]'"
# The modules that task families' code imports beyond lm-eval's own requirements, read from
# lm-eval 0.4.13: its `ifeval` extra (langdetect, immutabledict, nltk), its `math` extra (sympy,
# math_verify, antlr4-python3-runtime), and pkg_resources (leaderboard_ifeval only; setuptools 82
# dropped it). A family covers the tasks named after it (leaderboard_math: leaderboard_math_hard,
# leaderboard_math_algebra_hard, ...) and the groups it is named after (leaderboard).
IFEVAL = ("langdetect", "immutabledict", "nltk")
MATH = ("sympy", "math_verify", "antlr4")
TASK_MODULES: dict[str, tuple[str, ...]] = {
    "leaderboard_ifeval": (*IFEVAL, "pkg_resources"),
    "leaderboard_math": MATH,
    "ifeval": IFEVAL,
    "minerva_math": MATH,
}


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


def _in_family(task: str, family: str) -> bool:
    """Whether a task (or group) name runs code of a family: named after it, or a group above it."""
    return task == family or task.startswith(family + "_") or family.startswith(task + "_")


def missing_modules(task_names: list[str]) -> dict[str, list[str]]:
    """The modules each task needs that are not installed (tasks missing none left out)."""
    missing = {}
    for task in task_names:
        needed = [m for f, mods in TASK_MODULES.items() if _in_family(task, f) for m in mods]
        absent = [m for m in dict.fromkeys(needed) if find_spec(m) is None]
        if absent:
            missing[task] = absent
    return missing


def require_task_modules(task_names: list[str]) -> None:
    """Fail in one line, naming the tasks and the install command, if a task lacks its modules."""
    missing = missing_modules(task_names)
    if missing:
        what = "; ".join(f"{task} needs {', '.join(mods)}" for task, mods in missing.items())
        raise ConfigError(
            f"lm-eval tasks lack packages ({what}): run `{INSTALL_HINT}` in {REPO}, "
            "or pass bench eval --install"
        )


def install_command(root: Path = REPO) -> list[str]:
    """pip installing the project extra ``leaderboard``, under the repository's constraints if any."""
    constraints = root / "constraints.txt"
    pins = ["-c", str(constraints)] if constraints.exists() else []
    return [sys.executable, "-m", "pip", "install", *pins, "-e", f"{root}[leaderboard]"]


def install_task_modules(task_names: list[str]) -> None:
    """Install the extra ``leaderboard`` if some task lacks its modules (the caller checks again)."""
    if not missing_modules(task_names):
        return
    command = install_command()
    print("installing the packages of the lm-eval tasks: " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO, check=False).returncode != 0:
        raise ConfigError(f"pip failed: {' '.join(command)}")
    importlib.invalidate_caches()


def uses_chat_template(tok, chat_template: bool | None = None) -> bool:
    """Whether lm-eval applies the tokenizer's chat template: as asked, or (``None``) if it has one."""
    has_template = getattr(tok, "chat_template", None) is not None
    if chat_template and not has_template:
        raise ConfigError("the chat template is asked for, but the tokenizer has none")
    return has_template if chat_template is None else chat_template


def lmeval_scores(
    model,
    tok,
    task_names: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    chat_template: bool | None = None,
) -> dict:
    """``{"task/metric": value}`` from lm-eval on an in-memory model (HFLM), plus, per task asked
    for, ``"task/chat_template"``: whether its prompts went through the chat template (with the
    few-shot examples as turns), by default when the tokenizer has one."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    require_task_modules(task_names)
    chat = uses_chat_template(tok, chat_template)
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
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
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
    return scores | {f"{task}/chat_template": chat for task in task_names}
