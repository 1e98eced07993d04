"""Sweep files: validation names the offending key before anything runs; expansion is exact."""

import pytest

from bench.cli import main
from bench.harness.sweep import SWEEP_DIR, expand, load_sweep, load_sweep_config
from bench.loops.config import ConfigError, config_hash


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_expansion_counts_hashes_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "task: linear\nmethods: [rebel, chi2-rebel]\nseeds: [0, 1]\n"
        "radii: {chi2-rebel: [0.01, 0.1, 1.0]}\nsizes: [4, 8]\nscales: [64]\n",
    )
    sweep = expand(load_sweep_config(path), "s")
    assert len(sweep.cells) == (1 + 3) * 2 * 1 * 2
    chi2 = [c for c in sweep.cells if c.method == "chi2-rebel"]
    assert {c.config().method.rho for c in chi2} == {0.01, 0.1, 1.0}
    assert {c.config().task.d for c in sweep.cells} == {4, 8}
    hashes = {(c.method, config_hash(c.config())) for c in sweep.cells}
    assert len(hashes) == len(sweep.cells) // 2, "seeds share a config hash, everything else differs"
    again = expand(load_sweep_config(path), "s")
    assert [config_hash(c.config()) for c in again.cells] == [config_hash(c.config()) for c in sweep.cells]


def test_star_radii_apply_to_robust_methods_only(tmp_path):
    path = write(tmp_path, "task: linear\nmethods: [rebel, tv-rebel, kl-rebel]\nradii: {'*': [0.2, 0.4]}\n")
    sweep = expand(load_sweep_config(path), "s")
    assert sorted(c.method for c in sweep.cells) == ["kl-rebel", "kl-rebel", "rebel", "tv-rebel", "tv-rebel"]
    assert {c.config().method.tau for c in sweep.cells if c.method == "kl-rebel"} == {0.2, 0.4}


@pytest.mark.parametrize(
    "text,where",
    [
        ("task: linear\nmethod: [rebel]\n", "method"),  # unknown key
        ("task: linear\nmethods: []\n", "methods"),  # empty axis
        ("task: linear\nseeds: [zero]\n", "seeds"),  # wrong type
        ("task: linear\nradii: {chi2-rebel: [-1.0]}\nmethods: [chi2-rebel]\n", "method.rho"),  # bad radius
        ("task: linear\nradii: {dpo: [0.1]}\nmethods: [rebel]\n", "radii.dpo"),  # method not in sweep
        ("task: linear\nmethods: [chi3-rebel]\n", "chi3-rebel"),  # unknown method
        ("task: linear\nslurm: {gpus: 1}\n", "gpus"),  # unknown resource
        ("task: linear\noverrides: [train.lr=fast]\n", "train.lr"),  # override of the wrong type
        ("task: linear\nscales: []\n", "scales"),
    ],
)
def test_malformed_sweeps_name_the_key(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        expand(load_sweep_config(path), "s")


def test_shipped_sweeps_validate():
    names = [p.stem for p in SWEEP_DIR.glob("*.yaml") if p.stem != "radius-coverage"]
    assert {"smoke", "lexicon-grid"} <= set(names)
    for name in names:
        assert load_sweep(name).cells


def test_cli_axes_and_a_malformed_sweep_submit_nothing(tmp_path, capsys):
    bad = write(tmp_path, "task: linear\nmethods: [rebel]\nseeds: [0]\nbogus: 1\n")
    assert main(["run", "--sweep", str(bad), "--cluster", "debug", "--results", str(tmp_path / "r")]) == 2
    assert "bogus" in capsys.readouterr().err and not (tmp_path / "r").exists()
    args = [
        "run",
        "--task",
        "linear",
        "--methods",
        "rebel,chi2-rebel",
        "--radii",
        "0.05,0.5",
        "--scales",
        "32,64",
        "--cluster",
        "debug",
        "--results",
        str(tmp_path / "r"),
        "--quiet",
        "train.iterations=5",
        "train.eval_every=5",
        "task.n_test=32",
        "task.n_val=16",
    ]
    assert main(args) == 0
    assert "6 cells run" in capsys.readouterr().out
