"""What `bench eval` settles before scoring: the packages its lm-eval tasks import, and the chat template."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from bench.cli import main
from bench.loops import capability
from bench.loops.capability import (
    IFEVAL,
    INSTALL_HINT,
    MATH,
    REPO,
    install_command,
    lmeval_scores,
    missing_modules,
    uses_chat_template,
)
from bench.loops.config import ConfigError


@pytest.fixture
def nothing_installed(monkeypatch):
    """Every module looks absent to the check."""
    monkeypatch.setattr(capability, "find_spec", lambda name: None)


@pytest.fixture
def polarity_needs_a_missing_module(monkeypatch):
    monkeypatch.setitem(capability.TASK_MODULES, "bench_polarity", ("bench_no_such_module",))


def test_task_families_and_their_groups_need_their_modules(nothing_installed):
    missing = missing_modules(
        ["leaderboard", "leaderboard_ifeval", "leaderboard_math_hard", "leaderboard_bbh", "bench_polarity"]
    )
    assert missing == {
        "leaderboard": [*IFEVAL, "pkg_resources", *MATH],
        "leaderboard_ifeval": [*IFEVAL, "pkg_resources"],
        "leaderboard_math_hard": list(MATH),
    }


def test_installed_modules_are_not_missing():
    assert missing_modules(["bench_polarity", "leaderboard_bbh"]) == {}


def test_eval_fails_in_one_line_naming_the_tasks_and_the_install_command(
    polarity_needs_a_missing_module, tmp_path, capsys
):
    args = ["eval", "--tasks", "bench_polarity,bench_emotion_word", "--results", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "bench_polarity needs bench_no_such_module" in err and "bench_emotion_word" not in err
    assert INSTALL_HINT in err and "--install" in err


def test_in_memory_scoring_checks_before_touching_the_model(polarity_needs_a_missing_module):
    with pytest.raises(ConfigError, match="bench_polarity needs bench_no_such_module"):
        lmeval_scores(None, None, ["bench_polarity"])


def test_install_runs_pip_under_the_constraints_then_scores(
    polarity_needs_a_missing_module, monkeypatch, tmp_path, capsys
):
    commands = []

    def pip(command, cwd, check):
        commands.append((command, cwd))
        monkeypatch.setitem(capability.TASK_MODULES, "bench_polarity", ())  # now installed
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(capability.subprocess, "run", pip)
    assert main(["eval", "--tasks", "bench_polarity", "--results", str(tmp_path), "--install"]) == 1
    assert commands == [
        (
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-c",
                str(REPO / "constraints.txt"),
                "-e",
                f"{REPO}[leaderboard]",
            ],
            REPO,
        )
    ]
    assert "0 records scored" in capsys.readouterr().out  # it went on, to an empty results folder


def test_a_failed_install_stops_the_eval(polarity_needs_a_missing_module, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(capability.subprocess, "run", lambda c, cwd, check: subprocess.CompletedProcess(c, 1))
    assert main(["eval", "--tasks", "bench_polarity", "--results", str(tmp_path), "--install"]) == 2
    assert "pip failed" in capsys.readouterr().err


def test_install_without_missing_modules_runs_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(capability.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    assert main(["eval", "--tasks", "bench_polarity", "--results", str(tmp_path), "--install"]) == 1


def test_the_install_command_uses_constraints_only_where_the_repository_has_them(tmp_path):
    assert install_command(tmp_path)[3:] == ["install", "-e", f"{tmp_path}[leaderboard]"]
    (tmp_path / "constraints.txt").write_text("torch==2.13.0\n")
    assert install_command(tmp_path)[3:6] == ["install", "-c", str(tmp_path / "constraints.txt")]


@pytest.mark.parametrize(
    ("template", "asked", "applied"),
    [
        ("{{ messages }}", None, True),
        (None, None, False),
        ("{{ messages }}", False, False),
        ("{{ x }}", True, True),
    ],
)
def test_the_chat_template_applies_when_the_tokenizer_has_one_unless_told(template, asked, applied):
    assert uses_chat_template(SimpleNamespace(chat_template=template), asked) is applied


def test_asking_for_a_chat_template_the_tokenizer_lacks_fails():
    with pytest.raises(ConfigError, match="tokenizer has none"):
        uses_chat_template(SimpleNamespace(chat_template=None), True)
