"""Bad input gets one line on stderr naming the key or file and what is allowed, exit code 2, before
anything runs: no training, no job, nothing under the results folder (issue 17)."""

from pathlib import Path

import pytest

import bench.harness.launch as launch_module
from bench.cli import main, parse_seeds

RUN = ["run", "--results", "{results}", "--cluster", "debug", "--quiet"]
LINEAR = [*RUN, "--task", "linear"]

# (arguments, sweep file text or None, fragments the one error line must contain)
BAD = {
    "sweep-yaml-syntax": (["--sweep", "{sweep}"], "task: [linear\n", ["{sweep}", "invalid YAML"]),
    "sweep-python-tag": (
        ["--sweep", "{sweep}"],
        "task: !!python/object/apply:os.getcwd []\n",
        ["{sweep}", "invalid YAML"],
    ),
    "sweep-scalar-top-level": (["--sweep", "{sweep}"], "42\n", ["{sweep}", "mapping"]),
    "sweep-list-top-level": (["--sweep", "{sweep}"], "- task: linear\n", ["{sweep}", "mapping"]),
    "sweep-empty": (["--sweep", "{sweep}"], "", ["{sweep}", "empty", "linear"]),
    "sweep-no-task": (["--sweep", "{sweep}"], "methods: [dpo]\n", ["{sweep}", "task", "linear"]),
    "sweep-seed-too-large": (
        ["--sweep", "{sweep}"],
        "task: linear\nmethods: [dpo]\nseeds: [99999999999999999999]\n",
        ["seed", "2**32"],
    ),
    "methods-empty-list": (["--methods", ","], None, ["--methods", "comma-separated"]),
    "workers-negative": (["--methods", "dpo", "--workers", "-2"], None, ["--workers", "positive integer"]),
    "seeds-open-range": (["--methods", "dpo", "--seeds", "0-"], None, ["--seeds", "0-4"]),
    "seeds-too-large": (["--methods", "dpo", "--seeds", "99999999999999999999"], None, ["--seeds", "2**32"]),
    "seeds-too-many": (["--methods", "dpo", "--seeds", "0-100000000"], None, ["--seeds", "1000"]),
    "checkpoint-every-negative": (
        ["--methods", "dpo", "train.checkpoint_every=-1"],
        None,
        ["train.checkpoint_every = -1", ">= 0"],
    ),
    "threads-zero": (["--methods", "dpo", "train.threads=0"], None, ["train.threads = 0", ">= 1"]),
    "grad-clip-negative": (["--methods", "dpo", "train.grad_clip=-1"], None, ["train.grad_clip", ">= 0"]),
    "lr-zero": (["--methods", "dpo", "train.lr=0"], None, ["train.lr", "> 0"]),
    "device-bogus": (["--methods", "dpo", "train.device=bogus"], None, ["train.device", "auto, cpu"]),
    "shard-bogus": (["--methods", "dpo", "train.shard=zero3"], None, ["train.shard", "zero3"]),
    "shard-one-rank": (
        ["--methods", "dpo", "train.shard=fsdp"],
        None,
        ["train.shard=fsdp", "train.nproc > 1"],
    ),
    "shard-lmeval": (
        ["--methods", "dpo", "train.shard=fsdp", "train.nproc=2", "train.lmeval_tasks=[bench_polarity]"],
        None,
        ["train.lmeval_tasks", "bench eval"],
    ),
    "dpo-beta-zero": (["--methods", "dpo", "method.beta=0"], None, ["method.beta", "> 0"]),
    "dpo-beta-negative": (["--methods", "dpo", "method.beta=-0.1"], None, ["method.beta", "> 0"]),
    "rebel-eta-zero": (["--methods", "rebel", "method.eta=0"], None, ["method.eta", "> 0"]),
    "rebel-eta-negative": (["--methods", "rebel", "method.eta=-1"], None, ["method.eta", "> 0"]),
    "radius-on-method-without-it": (["--methods", "dpo", "method.rho=0.1"], None, ["method.rho", "chi2-dpo"]),
    "radii-without-robust-method": (["--methods", "dpo", "--radii", "0.1"], None, ["--radii", "chi2-dpo"]),
    "tracker-unknown": (
        ["--methods", "dpo", "train.report_to=[tensorbord]"],
        None,
        ["train.report_to", "tensorbord", "known: mlflow, tensorboard, trackio, wandb"],
    ),
}
TUNE_BAD = {
    "tune-seed-too-large": (["--tune-seed", "99999999999"], ["--tune-seed", "4294967"]),
    "tune-seed-negative": (["--tune-seed", "-1"], ["--tune-seed"]),
}
LEADERBOARD_BAD = {
    "leaderboard-missing-folder": (["--results", "{missing}"], ["{missing}", "does not exist"]),
    "leaderboard-unknown-task": (["--results", "{results}", "--task", "lexcon"], ["--task", "lexicon"]),
}


class Launched(Exception):
    """Raised by the stand-in for ``launch``: validation let the cells through."""


@pytest.fixture
def launched(monkeypatch):
    """``launch`` replaced by a stand-in that records the cells and stops: nothing trains."""
    calls = []

    def stand_in(cells, root, **kwargs):
        calls.append(cells)
        raise Launched(f"{len(cells)} cells reached launch")

    monkeypatch.setattr(launch_module, "launch", stand_in)
    return calls


@pytest.fixture
def places(tmp_path):
    """The placeholders of the rows: an empty results folder, a sweep file, a missing folder."""
    (tmp_path / "results").mkdir()
    return {
        "results": str(tmp_path / "results"),
        "sweep": str(tmp_path / "s.yaml"),
        "missing": str(tmp_path / "no"),
    }


def cli(argv: list[str], places: dict[str, str]) -> int | str:
    """``bench ARGV`` in process: its exit code, or what it reached when validation let it through."""
    try:
        return main([a.format(**places) for a in argv])
    except SystemExit as exit:
        return exit.code
    except Launched as err:
        return str(err)


def assert_refused(code, capsys, fragments: list[str], places: dict[str, str]) -> None:
    """Exit code 2, one line on stderr with every fragment, and an untouched results folder."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment.format(**places) in lines[0]
    assert not any(Path(places["results"]).rglob("*")), "something was written under results/"


@pytest.mark.parametrize("argv,sweep,fragments", BAD.values(), ids=BAD.keys())
def test_bad_run_input_is_refused_before_anything_runs(argv, sweep, fragments, places, launched, capsys):
    if sweep is not None:
        Path(places["sweep"]).write_text(sweep)
    base = RUN if sweep is not None else LINEAR
    assert_refused(cli([*base, *argv], places), capsys, fragments, places)
    assert not launched


@pytest.mark.parametrize("argv,fragments", TUNE_BAD.values(), ids=TUNE_BAD.keys())
def test_bad_tune_input_is_refused(argv, fragments, places, capsys):
    tune = ["tune", "--methods", "kldpo", "--task", "linear", "--cluster", "debug", "--results", "{results}"]
    assert_refused(cli([*tune, *argv], places), capsys, fragments, places)


@pytest.mark.parametrize("argv,fragments", LEADERBOARD_BAD.values(), ids=LEADERBOARD_BAD.keys())
def test_bad_leaderboard_input_is_refused(argv, fragments, places, capsys):
    assert_refused(cli(["leaderboard", *argv], places), capsys, fragments, places)


@pytest.mark.parametrize(
    "text,seeds", [("0-4", [0, 1, 2, 3, 4]), ("0-2,7", [0, 1, 2, 7]), ("4294967295", [2**32 - 1])]
)
def test_good_seeds_parse(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "argv,cells",
    [
        (["--methods", "dpo", "--seeds", "0-4"], 5),
        (["--methods", "dpo,kldpo,dpo"], 2),  # a method named twice is one cell (issue 17, item 2)
        # a radius key some methods of a multi-method run read is theirs; --radii sets each one's own
        (["--methods", "dpo,chi2-dpo", "method.rho=0.1"], 2),
        (["--methods", "dpo,chi2-dpo,kl-rebel", "--radii", "0.1,1"], 5),
        (["--methods", "dpo", "train.grad_clip=0", "train.checkpoint_every=0", "train.device=cpu"], 1),
    ],
)
def test_good_run_input_reaches_launch(argv, cells, places, launched, capsys):
    assert cli([*LINEAR, *argv], places) == f"{cells} cells reached launch"


def test_good_sweep_file_and_leaderboard_pass(places, launched, capsys):
    Path(places["sweep"]).write_text("task: linear\nmethods: [dpo]\nseeds: [0, 1]\n")
    assert cli([*RUN, "--sweep", "{sweep}"], places) == "2 cells reached launch"
    assert cli(["leaderboard", "--results", "{results}", "--task", "linear"], places) == 0
    assert "no completed runs" in capsys.readouterr().out
