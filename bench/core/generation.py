"""Generation backends behind one interface: who samples the training loop's responses.

A ``Generator`` samples ``k`` responses per prompt (``sample``) and takes the policy's new weights
after each optimizer step (``sync``). Two backends, chosen by name with ``make_generator``:

* ``hf`` (the default and the reference): ``bench.core.lm.sample`` itself, unchanged, on the
  training model (transformers ``generate``, batched, left-padded, KV cache, global torch RNG), so
  records stay bit-identical to a run without this module. ``sync`` is a no-op: the engine *is*
  the training model.
* ``vllm`` (optional, imported lazily): a vLLM engine colocated in the training process and on its
  GPU, as TRL's ``vllm_mode="colocate"`` and OpenRLHF's colocated workers do it. The engine holds a
  bf16 copy of the policy (built from the policy's config with dummy weights, then filled by
  ``sync``), a KV cache within ``gpu_memory_utilization`` of the GPU, and sleeps between rollouts
  (sleep mode) so that training gets its memory back. ``sync`` pushes the policy's ``state_dict``
  into the engine's model through the model's own ``load_weights`` (HF checkpoint names in; vLLM
  fuses q/k/v and gate/up and transposes GPT-2's Conv1D weights itself), called in-process with
  ``LLM.collective_rpc``.

Either way the backend returns token ids (and texts) only: the log-probs that training needs are
always recomputed by the training model (``bench.core.lm.sequence_logps``), so a backend changes
which tokens are sampled, never how they are scored.

vLLM pins its own torch (and transformers) release, so it cannot live in bench's CPU environment:
it is the optional extra ``vllm`` of pyproject.toml, installed in an environment of its own on a
CUDA machine. Reproducibility with vLLM: each ``sample`` call draws one base seed from torch's
global (CPU) RNG, so a run is reproducible given its seed; prompt ``i`` gets seed ``base + i*k`` and
vLLM gives its ``j``-th sample ``base + i*k + j`` (its parallel-sampling children add their index),
so no two samples share a random stream. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which vLLM's reproducibility guide names for deterministic
offline scheduling), and the global RNG states that vLLM reseeds while it starts are restored.
vLLM promises equal outputs only on the same hardware and vLLM version. The ``hf`` and ``vllm``
backends sample the same distribution (up to the engine's bf16 numerics) with different random
streams, so their records differ; only ``hf`` reproduces the records of earlier runs.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from bench.core import lm
from bench.core.lm import Samples, Sampling

DEFAULT_GENERATOR = "hf"

VLLM_MISSING = (
    "train.generator=vllm needs vLLM, which is not installed here: install the `vllm` extra "
    "(pip install -e '.[vllm]') in its own CUDA environment, since vLLM pins its own torch"
)


@runtime_checkable
class Generator(Protocol):
    """Samples responses for the training loop and follows the policy's weights."""

    name: str

    def sample(self, prompts: list[str], k: int, sampling: Sampling) -> Samples:
        """``k`` responses per prompt; sample ``j`` of prompt ``i`` at ``i*k + j`` (``lm.Samples``)."""
        ...

    def sync(self, policy: torch.nn.Module) -> None:
        """Take the policy's current weights (call after each optimizer step)."""
        ...

    def close(self) -> None:
        """Release the engine (GPU memory, temporary files)."""
        ...


class HFGenerator:
    """The reference: ``bench.core.lm.sample`` on the training model itself."""

    name = "hf"

    def __init__(self, policy: torch.nn.Module, tok):
        self.policy, self.tok = policy, tok

    def sample(self, prompts: list[str], k: int, sampling: Sampling) -> Samples:
        return lm.sample(self.policy, self.tok, prompts, k, sampling)

    def sync(self, policy: torch.nn.Module) -> None:
        """Nothing to push: generation reads the training model's own parameters."""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# vLLM: the pure parts (sampling parameters, seeds, weight names and dtypes), testable without it


def vllm_sampling_kwargs(
    sampling: Sampling, k: int, seed: int, eos_token_id: int | None = None, prompt_len: int = 0
) -> dict:
    """The ``vllm.SamplingParams`` keyword arguments of one prompt, mapped from bench's ``Sampling``
    so that vLLM samples from the same distribution as ``lm.sample``: temperature, nucleus ``top_p``
    and ``top_k`` as given (0 is "off" in both), no min-p or penalties, at most
    ``sampling.budget(prompt_len)`` new tokens, ``n=k`` samples, stopping at the tokenizer's EOS (kept
    in the output, as ``lm.sample`` keeps it). Token ids only: no detokenization, no log-probs."""
    if k < 1:
        raise ValueError(f"k={k}: at least one sample per prompt")
    if sampling.temperature <= 0:
        raise ValueError(f"temperature={sampling.temperature}: bench samples, it never decodes greedily")
    return {
        "n": k,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k),
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": max(1, sampling.budget(prompt_len)),
        "min_tokens": 0,
        "seed": int(seed),
        "stop_token_ids": [] if eos_token_id is None else [int(eos_token_id)],
        "ignore_eos": False,
        "detokenize": False,
        "logprobs": None,
    }


SEED_RANGE = 2**31 - 1


def draw_seed() -> int:
    """One base seed from torch's global CPU RNG (so it follows ``torch.manual_seed`` of the run)."""
    return int(torch.randint(0, SEED_RANGE, (1,)).item())


def request_seeds(base: int, n_prompts: int, k: int) -> list[int]:
    """Per-prompt seeds: vLLM seeds sample ``j`` of a prompt with ``seed + j``, so prompt ``i`` gets
    ``base + i*k`` and every sample of the call its own stream ``base + i*k + j``."""
    return [base + i * k for i in range(n_prompts)]


# Wrappers that rename a module's parameters without changing them: DDP, torch.compile, the
# activation-checkpoint and FSDP wrappers (TRL strips the same two infixes before load_weights).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
# Entries of a state_dict that are not weights of the engine's model (masks, rotary caches);
# vLLM's own loaders skip them too. Recent transformers keep them out of state_dict anyway.
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def vllm_weight_name(name: str) -> str:
    """The checkpoint name vLLM's ``load_weights`` expects for a training-model parameter: the
    transformers name with wrapper prefixes removed (vLLM maps HF names to its fused layers)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


def engine_weights(
    state_dict: Mapping[str, Tensor], dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs to push into the engine, one per distinct weight: names mapped by
    ``vllm_weight_name``, floating tensors cast to the engine's ``dtype`` (detached), non-weights
    skipped, and a tied weight (GPT-2's and SmolLM2's ``lm_head.weight`` is the token embedding)
    sent once under its first name. Lazy, so a large model is converted a tensor at a time."""
    seen: set[tuple] = set()
    for name, tensor in state_dict.items():
        target = vllm_weight_name(name)
        if target.endswith(NOT_WEIGHTS):
            continue
        storage = tensor.untyped_storage().data_ptr()
        key = (tensor.device, storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach()
        yield target, tensor.to(dtype) if tensor.is_floating_point() else tensor


def chunks(weights: Iterator[tuple[str, Tensor]], max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive lists of weights of at most ``max_bytes`` each (a larger tensor goes alone)."""
    chunk: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


def _load_weights(worker, weights: list[tuple[str, Tensor]]) -> None:
    """Runs on the vLLM worker (``collective_rpc`` passes the worker as the first argument): the
    model's own loader, as TRL's colocate sync and OpenRLHF's worker extension call it."""
    worker.model_runner.model.load_weights(weights=weights)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's (if loaded) and torch's global RNG states on exit: an in-process
    vLLM reseeds them while it starts, and bench's streams must not notice."""
    py = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            if np_state is not None:
                np.random.set_state(np_state)


@dataclass
class VLLMOptions:
    """Engine settings of the ``vllm`` backend (keyword arguments of ``make_generator``)."""

    # Of the whole GPU, for vLLM's weights, activations and KV cache; it must fit in what is free when
    # the engine starts (the policy and the reference are on the GPU already), the rest trains.
    gpu_memory_utilization: float = 0.3
    # Between rollouts: 0 no sleep mode, 1 weights backed up to CPU and KV cache freed, 2 both freed
    # (sample pushes the weights again if no sync came). 1 by default: level 2 has produced garbage
    # after waking in some vLLM versions and models (vllm#29341, NVIDIA-NeMo/RL#2631).
    sleep_level: int = 1
    dtype: str = "bfloat16"  # the engine's weights and compute; sync casts the fp32 master weights
    max_model_len: int | None = None  # prompt + response tokens; None: the model's context length
    enforce_eager: bool = False  # True skips CUDA-graph capture (faster start, slower decoding)
    sync_chunk_bytes: int = 2**30  # weights converted and loaded per load_weights call
    engine_kwargs: dict = field(default_factory=dict)  # to vllm.LLM as they are (max_num_seqs, ...)


class VLLMGenerator:
    """vLLM in colocate mode: the engine lives in this process, on the policy's GPU.

    ``engine`` and ``sampling_params`` are for tests: an object with vLLM's ``LLM`` methods that
    this class calls (``generate``, ``collective_rpc``, ``reset_prefix_cache``, ``sleep``,
    ``wake_up``) and the factory of the per-prompt sampling parameters (``vllm.SamplingParams``).
    """

    name = "vllm"

    def __init__(
        self, policy: torch.nn.Module, tok, engine=None, sampling_params: Callable | None = None, **options
    ):
        self.policy, self.tok = policy, tok
        self.options = VLLMOptions(**options)
        if self.options.sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level={self.options.sleep_level}: 0 (off), 1 or 2")
        self.dtype = getattr(torch, self.options.dtype)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if engine is None:
            engine = self._start_engine(policy, tok)
        if sampling_params is None:
            from vllm import SamplingParams as sampling_params
        self.engine, self.sampling_params = engine, sampling_params
        self._asleep: set[str] = set()  # the engine's tags now asleep ("weights", "kv_cache")
        self._stale = False  # weights dropped (level-2 sleep) and not pushed again since
        self.sync(policy)  # the engine starts from dummy weights
        self._sleep()

    # -- engine lifecycle ------------------------------------------------------------------------

    def _start_engine(self, policy: torch.nn.Module, tok):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("train.generator=vllm runs one rank per cell for now (train.nproc=1)")
        device = next(policy.parameters()).device
        if device.type != "cuda" or (device.index or 0) != 0:
            raise RuntimeError(
                f"train.generator=vllm colocates vLLM with the policy on cuda:0, but the policy is on "
                f"{device}; pick the GPU with CUDA_VISIBLE_DEVICES and train.device=cuda"
            )
        # The engine is built from the policy's config and tokenizer only; its dummy weights are
        # replaced by the first sync, so nothing is written to disk but a few small JSON files.
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")
        config = copy.deepcopy(policy.config)
        config.architectures = [type(policy).__name__]
        config.save_pretrained(self._tmp.name)
        tok.save_pretrained(self._tmp.name)
        # In-process engine (set before vLLM reads its environment): collective_rpc runs our loader
        # on the worker without serializing tensors, and scheduling is deterministic (vLLM's
        # reproducibility guide).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        opts = self.options
        kwargs = {
            "model": self._tmp.name,
            "tokenizer": self._tmp.name,
            "load_format": "dummy",
            "dtype": opts.dtype,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "enable_sleep_mode": opts.sleep_level > 0,
            "max_model_len": opts.max_model_len,
            "enforce_eager": opts.enforce_eager,
            "generation_config": "vllm",  # no sampling defaults from the model's generation_config
            "seed": 0,  # the engine's own; every request carries its seed
            **opts.engine_kwargs,
        }
        with preserved_rng():
            return LLM(**kwargs)

    def _sleep(self) -> None:
        level = self.options.sleep_level
        if level:
            self.engine.sleep(level=level)
            self._asleep = {"weights", "kv_cache"}
            self._stale = level == 2

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # TRL: needed to avoid OOM in some cases
            self.engine.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- the interface -----------------------------------------------------------------------------

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Push ``policy.state_dict()`` (bf16, every weight once) into the engine's model and drop
        the prefix cache, whose KV entries belong to the old weights."""
        self.policy = policy
        self._wake("weights")  # load_weights must write into mapped memory (TRL issue #5142)
        weights = engine_weights(policy.state_dict(), self.dtype)
        for chunk in chunks(weights, self.options.sync_chunk_bytes):
            self.engine.collective_rpc(_load_weights, args=(chunk,))
        self.engine.reset_prefix_cache()
        self._stale = False

    @torch.no_grad()
    def sample(self, prompts: list[str], k: int, sampling: Sampling) -> Samples:
        start = time.perf_counter()
        tok = self.tok
        prompt_ids = [sampling.prompt(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
        eos = tok.eos_token_id
        base = draw_seed()
        params = [
            self.sampling_params(**vllm_sampling_kwargs(sampling, k, seed, eos, len(ids)))
            for seed, ids in zip(request_seeds(base, len(prompts), k), prompt_ids, strict=True)
        ]
        if self._stale:  # level-2 sleep dropped the weights and no sync came since: push them again
            self.sync(self.policy)
        self._wake("weights")
        self._wake("kv_cache")
        no_autocast = torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else nullcontext()
        with preserved_rng(), no_autocast:
            outputs = self.engine.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params, use_tqdm=False
            )
        self._sleep()
        responses = parse_outputs(outputs, k, eos)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        return Samples(prompt_ids, responses, texts, time.perf_counter() - start)


def parse_outputs(outputs: list, k: int, eos: int | None) -> list[list[int]]:
    """Response ids in ``lm.Samples`` order (sample ``j`` of prompt ``i`` at ``i*k + j``), cut after
    the first EOS as ``lm.sample`` cuts them (vLLM stops there already)."""
    responses: list[list[int]] = []
    for request in outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != k:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for a prompt, expected {k}")
        for completion in completions:
            row = list(completion.token_ids)
            responses.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return responses


# ---------------------------------------------------------------------------------------------
# The registry


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


GENERATORS: dict[str, tuple[Callable[..., Generator], Callable[[], bool]]] = {
    "hf": (HFGenerator, lambda: True),
    "vllm": (VLLMGenerator, _vllm_available),
}
MISSING = {"vllm": VLLM_MISSING}


class GeneratorUnavailable(RuntimeError):
    """The backend is known but its library is not installed in this environment."""


def check_generator(name: str) -> None:
    """Fail fast (before a run loads anything) on an unknown backend or one whose library is absent."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}")
    if not GENERATORS[name][1]():
        raise GeneratorUnavailable(MISSING[name])


def make_generator(name: str, policy: torch.nn.Module, tok, **options: Any) -> Generator:
    """The backend ``name`` (``hf`` or ``vllm``) for ``policy``; ``options`` go to the backend
    (``VLLMOptions`` fields for ``vllm``; ``hf`` takes none)."""
    check_generator(name)
    return GENERATORS[name][0](policy, tok, **options)
