"""The paper tasks' defaults follow their published protocols: every setting with a config key holds
the published value unless it says why it departs; the README's protocol table is ``bench protocols``
output; the paper sweeps do not override a protocol setting; the log-prob temperature follows each
loss family's official code unless a protocol fixes it."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.harness.protocols import README_BEGIN, README_END, bench_value, follows, markdown, protocols, show
from bench.harness.sweep import load_sweep
from bench.loops.config import ConfigError, build_config
from tasks.registry import Setting

ROOT = Path(__file__).resolve().parents[1]


def test_the_paper_tasks_name_their_protocols():
    assert {"emotion": "dro-rebel-emotion", "armorm": "dro-rebel-armorm"}.items() <= {
        task: p.name for task, p in protocols().items()
    }.items()


@pytest.mark.parametrize("task", ["emotion", "armorm"])
def test_every_setting_is_followed_or_says_why_not(task):
    for s in protocols()[task].settings:
        assert s.source, s
        if s.departs:
            continue
        assert s.key, f"{s.what}: a setting bench follows names the config key that holds it"
        assert follows(task, s), f"{task} {s.what}: bench {bench_value(task, s)!r}, published {s.published!r}"


def test_a_changed_default_breaks_the_match():
    s = Setting("top-k", "50", "x", "task.top_k")
    assert follows("emotion", s)
    assert not follows("emotion", Setting("top-k", "0", "x", "task.top_k"))
    assert bench_value("armorm", Setting("W rho0", "0.5", "x", "method.rho0", "wdpo")) == "0.5"


def test_scoped_defaults_reach_only_their_methods():
    """armorm's chi-square radius 0.5 (the code passes rho0) is not TV's radius."""
    assert build_config("armorm", "chi2-rebel").method.rho == 0.5
    assert build_config("armorm", "tv-dpo").method.rho == 0.1  # the TV knob's own default
    assert build_config("armorm", "w-rebel").method.rho0 == 0.5
    assert build_config("emotion", "w-rebel").method.rho0 == 0.01


def test_show_writes_values_as_the_table_does():
    assert [show(v) for v in (1e-5, 0.01, 16000, True, ["joy", "sadness"], None)] == [
        "1e-05",
        "0.01",
        "16000",
        "true",
        "joy, sadness",
        "none",
    ]


def test_the_readme_table_is_bench_protocols_output():
    text = (ROOT / "README.md").read_text()
    assert README_BEGIN in text and README_END in text
    table = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == markdown().strip(), "regenerate it: bench protocols"


@pytest.mark.parametrize("name", ["paper-emotion", "paper-armorm"])
def test_the_paper_sweeps_follow_the_protocol(name):
    sweep = load_sweep(name)
    keys = {s.key for s in protocols()[sweep.config.task].settings if s.key and not s.departs}
    for cell in sweep.cells:
        overridden = {o.split("=", 1)[0] for o in cell.overrides}
        allowed = {"task.size", "task.n"}  # the sweep's axes: model sizes and data scales
        assert not (overridden & keys) - allowed - {f"method.{k}" for k in ("rho", "rho0", "tau", "eps")}


@pytest.mark.parametrize(
    ("task", "method", "overrides", "expected"),
    [
        ("lexicon", "rebel", ["task.temperature=0.5"], 0.5),  # REBEL: the sampling temperature
        ("lexicon", "kl-rebel", ["task.temperature=0.5"], 0.5),
        ("lexicon", "dpo", ["task.temperature=0.5"], 1.0),  # the DPO family: none
        ("lexicon", "wdpo", ["task.temperature=0.5"], 1.0),
        ("lexicon", "ipo", ["task.temperature=0.5"], 1.0),
        ("lexicon", "dpo", ["task.temperature=0.5", "method.logp_temperature=0.5"], 0.5),
        ("emotion", "rebel", [], 1.0),  # the DRO-REBEL code takes raw logits for every method
        ("linear", "rebel", [], 1.0),  # a task that samples no tokens
    ],
)
def test_log_prob_temperature_follows_the_family_and_is_recorded(task, method, overrides, expected):
    cfg = build_config(task, method, overrides)
    assert cfg.method.logp_temperature == expected
    assert OmegaConf.to_container(cfg)["method"]["logp_temperature"] == expected  # in the record


def test_a_bad_log_prob_temperature_or_group_update_is_refused():
    with pytest.raises(ConfigError, match=r"method\.logp_temperature"):
        build_config("lexicon", "dpo", ["method.logp_temperature=0"])
    with pytest.raises(ConfigError, match=r"method\.group_update='nope'; known: bench, official"):
        build_config("lexicon", "gr-dpo", ["method.group_update=nope"])
