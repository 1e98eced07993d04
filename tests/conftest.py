import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(2)

import pytest  # noqa: E402

# A short pretraining keeps the tiny lexicon preset build at a few seconds in tests.
LEXICON_FAST = (
    "task.pretrain_steps=60",
    "task.n=24",
    "task.n_val=8",
    "task.n_test=12",
    "task.max_new_tokens=8",
    "train.iterations=4",
    "train.batch_size=6",
    "train.eval_every=2",
    "eval.samples=1",
)


@pytest.fixture(scope="session", autouse=True)
def bench_cache(tmp_path_factory):
    """A private preset cache for the session (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("bench-cache")
    old = os.environ.get("BENCH_CACHE_DIR")
    os.environ["BENCH_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BENCH_CACHE_DIR", None)
    else:
        os.environ["BENCH_CACHE_DIR"] = old
