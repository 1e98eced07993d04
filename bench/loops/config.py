"""Typed run configuration (dataclasses under OmegaConf), ``key=value`` overrides, config hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import methods
import tasks
from bench.core.generation import GENERATORS
from methods.robust import GROUP_UPDATES


class Anchor(str, Enum):
    """What the log-ratios are taken against: a fixed reference or the sampling iterate (REBEL)."""

    fixed_ref = "fixed_ref"
    prev_iterate = "prev_iterate"


class Labels(str, Enum):
    """Preference labels for the DPO family from the mixture reward."""

    bernoulli = "bernoulli"  # y ~ Bernoulli(sigmoid(r1 - r2)) (Bradley-Terry sample)
    soft = "soft"  # p = sigmoid(r1 - r2)
    argmax = "argmax"  # 1[r1 >= r2]


class RebelForm(str, Enum):
    inv_eta = "inv_eta"
    eta_reward = "eta_reward"


class WForm(str, Enum):
    sqrt_mean = "sqrt_mean"
    per_sample_sq = "per_sample_sq"


class DataMode(str, Enum):
    online = "online"  # fresh pairs from the current policy every iteration
    offline = "offline"  # one fixed pair set sampled from the reference policy


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


@dataclass
class MethodConfig:
    """The method and its hyperparameters; radius knobs left at None take the method's default."""

    name: str = "rebel"
    eta: float = 0.01  # REBEL step size
    rebel_form: RebelForm = RebelForm.inv_eta
    beta: float = 0.1  # DPO / IPO temperature
    labels: Labels = Labels.bernoulli
    anchor: Anchor = Anchor.fixed_ref
    w_form: WForm = WForm.sqrt_mean
    rho: float | None = None  # chi2 / tv radius
    tau: float | None = None  # KL temperature (inverse radius)
    eps: float | None = None  # KL-ball radius
    rho0: float | None = None  # Wasserstein radius
    beta_prime: float | None = None  # Dr. DPO temperature
    eta_alpha: float | None = None  # group-robust step size
    group_update: str = "bench"  # GR-DPO/GR-IPO: bench | official (methods.robust.group_step)
    # Logits are divided by this before the log-probs of a pair (policy and anchor). None: the loss
    # family's official convention, recorded as its value: the task's sampling temperature for REBEL,
    # 1 for the DPO family (methods.registry.SAMPLING_TEMPERATURE_LOSSES).
    logp_temperature: float | None = None


@dataclass
class TrainConfig:
    iterations: int = 100
    batch_size: int = 64  # prompts (pairs) per iteration
    micro_batch: int = 0  # 0: the whole batch in one pass
    lr: float = 1e-5
    optimizer: Optimizer = Optimizer.adamw
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 25
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    warmup: int = 0  # linear learning-rate warm-up steps
    data: DataMode = DataMode.online
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # CPU threads of one cell (cells run in parallel); equal counts give identical numbers
    save_model: bool = False  # keep the final policy in the run folder (for `bench eval`)
    lmeval_tasks: list[str] = field(default_factory=list)  # capability tasks scored in memory at the end
    precision: Precision = Precision.auto  # auto: bf16 autocast on CUDA with bf16, else fp32
    grad_checkpointing: bool = False  # recompute each layer in the backward: activations ~ 1/L
    nproc: int = 1  # ranks of one cell (data parallel; torch.distributed.run locally, SLURM tasks)
    generator: str = "hf"  # training rollouts: hf (transformers generate, the reference) | vllm
    generator_options: dict[str, Any] = field(default_factory=dict)  # vllm: VLLMOptions fields


@dataclass
class EvalConfig:
    """How a policy is scored on the held-out prompts (every evaluation, every method alike)."""

    # responses per evaluation prompt, averaged per prompt: 4 halves the within-run standard error of
    # the worst case on the lexicon task (0.109 -> 0.052, val-selected) for +31% cell time (README)
    samples: int = 4


@dataclass
class RunConfig:
    task: Any = None  # the task's own dataclass
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


class ConfigError(ValueError):
    """A configuration that cannot run, with the offending key named."""


def build_config(
    task: str, method: str, overrides: list[str] | tuple[str, ...] = (), seed: int = 0
) -> DictConfig:
    """The typed config of one cell: dataclass defaults < task defaults < overrides.

    Overrides are ``key=value`` strings (``method.rho=0.1``, ``task.n=2000``, ``train.lr=1e-3``).
    Unknown keys, wrong types, unknown names and out-of-range radii raise ``ConfigError``.
    """
    spec = tasks.get(task)
    m = methods.get(method)
    if m.loss not in spec.losses:
        raise ConfigError(f"method {method!r} ({m.loss} loss) does not run on task {task!r}")
    base = OmegaConf.structured(RunConfig(task=spec.config_cls(), seed=seed))
    base.method.name = method
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        cfg = OmegaConf.merge(
            base,
            OmegaConf.from_dotlist(spec.defaults_for(method, m.aggregator.name)),
            OmegaConf.from_dotlist(list(overrides)),
        )
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0] + f" (in overrides {list(overrides)})") from None
    if cfg.method.name != method:
        raise ConfigError("choose the method with --methods, not method.name")
    knob = methods.get(method).knob
    if knob is not None:  # record the effective radius: "default" and its value hash alike
        cfg.method[knob.name] = method_radius(cfg)
    cfg.method.logp_temperature = logp_temperature(cfg, m)
    if cfg.method.group_update not in GROUP_UPDATES:
        raise ConfigError(
            f"method.group_update={cfg.method.group_update!r}; known: {', '.join(GROUP_UPDATES)}"
        )
    if cfg.eval.samples < 1:
        raise ConfigError(f"eval.samples must be >= 1, got {cfg.eval.samples}")
    for key in ("iterations", "batch_size", "eval_every", "nproc"):
        if cfg.train[key] <= 0:
            raise ConfigError(f"train.{key} must be positive, got {cfg.train[key]}")
    nproc = cfg.train.nproc
    if cfg.train.batch_size % nproc:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must split evenly over train.nproc={nproc}"
        )
    if cfg.train.generator not in GENERATORS:
        raise ConfigError(f"train.generator={cfg.train.generator!r}; known: {', '.join(GENERATORS)}")
    if cfg.train.generator == "vllm" and nproc > 1:
        raise ConfigError("train.generator=vllm runs one rank per cell (train.nproc=1)")
    if nproc > 1 and spec.trainer != "lm":
        raise ConfigError(f"train.nproc > 1 runs the language-model loop only; task {task} has none")
    spec.validate(cfg.task)
    return cfg


def logp_temperature(cfg: DictConfig, method: methods.Method) -> float:
    """``method.logp_temperature``, or the family's convention when None: the task's sampling
    temperature (``task.temperature``, 1 where a task samples nothing) for REBEL, else 1."""
    value = cfg.method.logp_temperature
    if value is None:
        sampling = float(cfg.task.get("temperature", 1.0))
        return sampling if method.logps_at_sampling_temperature else 1.0
    if not value > 0:
        raise ConfigError(f"method.logp_temperature={value}: must be > 0 (or unset for the family's)")
    return float(value)


def method_radius(cfg: DictConfig) -> float:
    """The radius-like knob of the configured method (validated), 0 for non-robust methods."""
    knob = methods.get(cfg.method.name).knob
    if knob is None:
        return 0.0
    try:
        return knob.validate(cfg.method.get(knob.name), where=f"method.{knob.name}")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def config_hash(cfg: DictConfig) -> str:
    """A stable 12-hex-digit hash of everything but the seed (cells differing only in seed share it)."""
    payload = to_dict(cfg)
    payload.pop("seed", None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def loss_kwargs(cfg: DictConfig) -> dict:
    """Keyword arguments of the configured method's pointwise loss."""
    loss = methods.get(cfg.method.name).loss
    if loss == "rebel":
        return {"eta": cfg.method.eta, "form": str(cfg.method.rebel_form.value)}
    if loss == "bt":
        return {}
    return {"beta": cfg.method.beta}
