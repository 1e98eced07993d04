"""Typed run configuration (dataclasses under OmegaConf), ``key=value`` overrides, config hashes."""

from __future__ import annotations

import hashlib
import json
import math
import re
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


class Shard(str, Enum):
    """How an N-rank cell holds its policy and frozen reference: whole on every rank (replicate),
    sharded with FSDP2 (fsdp), or fsdp only where ``bench plan`` says the cell does not fit on
    one GPU (auto, resolved by the job on its node: ``Cell.shard``)."""

    auto = "auto"
    replicate = "replicate"
    fsdp = "fsdp"


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
    shard: Shard = Shard.auto  # with nproc > 1: replicate | fsdp | auto (fsdp where it does not fit)
    generator: str = "hf"  # training rollouts: hf (transformers generate, the reference) | vllm
    generator_options: dict[str, Any] = field(default_factory=dict)  # vllm: VLLMOptions fields
    # experiment trackers (bench.loops.trackers): tensorboard, wandb, mlflow, trackio; not hashed
    report_to: list[str] = field(default_factory=list)


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


# Seeds are numpy's (< 2**32); what the loops derive from one (seed * 7_368_787 + 1,
# seed * 1_000_003 + iteration + rank * 104_729) then stays within torch's 64-bit seeds.
MAX_SEED = 2**32
# Seeds of one run: each is a cell whose config is built to validate it (~30 ms) before anything runs.
MAX_SEEDS = 1_000
DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")  # train.device: torch.device names bench supports

# Lower bounds of numeric keys: (key, bound, strict); every value must also be finite.
LOWER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("method.eta", 0, True),
    ("method.beta", 0, True),
    ("train.lr", 0, True),
    ("train.iterations", 1, False),
    ("train.batch_size", 1, False),
    ("train.eval_every", 1, False),
    ("train.nproc", 1, False),
    ("train.threads", 1, False),
    ("train.micro_batch", 0, False),
    ("train.weight_decay", 0, False),
    ("train.grad_clip", 0, False),
    ("train.checkpoint_every", 0, False),
    ("train.warmup", 0, False),
    ("eval.samples", 1, False),
)
# Method keys only some methods read, by loss (the radius knobs are found from the registry).
LOSS_KEYS = {"eta": ("rebel",), "rebel_form": ("rebel",), "beta": ("dpo", "ipo")}


def check_seed(seed: object, where: str = "seed") -> int:
    """``seed`` if it is an integer in ``[0, MAX_SEED)``; else a ``ConfigError`` naming ``where``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ConfigError(f"{where} = {seed}: must be an integer in [0, 2**32)")
    return seed


def check_lower_bounds(cfg: DictConfig) -> None:
    """Every key of ``LOWER_BOUNDS`` finite and above its bound, else a ``ConfigError`` naming it."""
    for key, bound, strict in LOWER_BOUNDS:
        value = OmegaConf.select(cfg, key)
        ok = math.isfinite(value) and (value > bound if strict else value >= bound)
        if not ok:
            raise ConfigError(f"{key} = {value}: must be {'>' if strict else '>='} {bound:g}")


def check_device(cfg: DictConfig, trainer: str) -> None:
    """``train.device`` one of auto, cpu, cuda, cuda:N; the linear loop runs on the CPU only."""
    device = cfg.train.device
    if not DEVICES.fullmatch(device):
        raise ConfigError(f"train.device = {device!r}: must be auto, cpu, cuda or cuda:N")
    if trainer == "linear" and device not in ("auto", "cpu"):
        raise ConfigError(f"train.device = {device!r}: the linear loop runs on the CPU; use auto or cpu")


def method_key_users(key: str) -> list[str] | None:
    """The methods that read ``method.<key>``: a radius knob's methods, the REBEL loss's ``eta`` and
    ``rebel_form``, the DPO and IPO losses' ``beta``; None for a key that every method reads."""
    users = [n for n in methods.names() if getattr(methods.get(n).knob, "name", None) == key]
    if not users and key in LOSS_KEYS:
        users = [n for n in methods.names() if methods.get(n).loss in LOSS_KEYS[key]]
    return users or None


def build_config(
    task: str, method: str, overrides: list[str] | tuple[str, ...] = (), seed: int = 0
) -> DictConfig:
    """The typed config of one cell: dataclass defaults < task defaults < overrides.

    Overrides are ``key=value`` strings (``method.rho=0.1``, ``task.n=2000``, ``train.lr=1e-3``).
    Unknown keys, wrong types, unknown names, out-of-range radii, numbers below their bound
    (``LOWER_BOUNDS``), seeds outside ``[0, 2**32)`` and unknown devices raise ``ConfigError``.
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
    check_seed(cfg.seed)
    check_lower_bounds(cfg)
    check_device(cfg, spec.trainer)
    nproc = cfg.train.nproc
    if cfg.train.batch_size % nproc:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must split evenly over train.nproc={nproc}"
        )
    if cfg.train.generator not in GENERATORS:
        raise ConfigError(f"train.generator={cfg.train.generator!r}; known: {', '.join(GENERATORS)}")
    if cfg.train.generator == "vllm" and nproc > 1:
        raise ConfigError("train.generator=vllm runs one rank per cell (train.nproc=1)")
    if cfg.train.shard == Shard.fsdp and nproc == 1:
        raise ConfigError("train.shard=fsdp shards over the ranks of a cell: set train.nproc > 1")
    if cfg.train.shard == Shard.fsdp and cfg.train.lmeval_tasks:
        raise ConfigError(
            "train.lmeval_tasks scores an unsharded policy: with train.shard=fsdp, save it "
            "(train.save_model=true) and score it with `bench eval`"
        )
    check_report_to(list(cfg.train.report_to))
    if nproc > 1 and spec.trainer != "lm":
        raise ConfigError(f"train.nproc > 1 runs the language-model loop only; task {task} has none")
    spec.validate(cfg.task)
    return cfg


def check_report_to(names: list[str]) -> None:
    """Every tracker of ``train.report_to`` known and installed, else one line naming it."""
    if not names:
        return
    from bench.loops.trackers import check_trackers

    try:
        check_trackers(names)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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


# Keys added after results existed: at these values they are left out of the hash, so that the
# cells of earlier results keep their run folders.
HASHED_UNLESS = {("train", "shard"): "auto"}


def config_hash(cfg: DictConfig) -> str:
    """A stable 12-hex-digit hash of everything but the seed (cells differing only in seed share
    it), where a cell reports (``train.report_to``: switching a tracker on re-runs nothing) and
    the ``HASHED_UNLESS`` keys at their first values."""
    payload = to_dict(cfg)
    payload.pop("seed", None)
    payload["train"].pop("report_to", None)
    for (section, key), value in HASHED_UNLESS.items():
        if payload.get(section, {}).get(key, value) == value:
            payload.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def loss_kwargs(cfg: DictConfig) -> dict:
    """Keyword arguments of the configured method's pointwise loss."""
    loss = methods.get(cfg.method.name).loss
    if loss == "rebel":
        return {"eta": cfg.method.eta, "form": str(cfg.method.rebel_form.value)}
    if loss == "bt":
        return {}
    return {"beta": cfg.method.beta}
