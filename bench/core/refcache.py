"""A content-addressed cache of reference data (offline pairs and their reference log-probs, the
head scaler and the iteration-0 evaluation).

Keyed by what produced the data (task config, seed, sampling, labels; for the evaluation also a
fingerprint of the code that computes it) and guarded by a fingerprint of the reference model's
weights: every method and radius of a sweep reuses one computation, and a cache built from other
weights under the same key (a rebuilt preset, a changed checkpoint) is refused loudly instead of
silently reused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

from bench.core.artifacts import cache_dir, load_or_set_aside, save_tensors

FULL_HASH_LIMIT = 50_000_000  # parameters; larger models hash a strided sample of every tensor
REPO = Path(__file__).resolve().parents[2]  # the folder holding the bench, methods and tasks packages


class StaleCacheError(RuntimeError):
    pass


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of parameter names, shapes and values (a strided sample for large models)."""
    total = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        if total > FULL_HASH_LIMIT:
            flat = flat[:: max(1, flat.numel() // 4096)]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()


PACKAGES = ("bench", "methods", "tasks")  # the repository's code


def code_files(root: Path = REPO) -> list[Path]:
    """Every Python source and packaged data file of the repository's packages, sorted."""
    return sorted(
        p for pkg in PACKAGES for p in (root / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


@cache
def code_fingerprint(root: Path = REPO) -> str:
    """SHA-256 of the repository's code (``code_files``) and of the name and version of every
    installed distribution: a value cached by other code (an edited reward, sampler or loop, another
    torch or lexicon wheel) is never read back. Coarse on purpose: any change recomputes once per
    seed, and no import analysis can miss a file."""
    digest = hashlib.sha256()
    for path in code_files(root):
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    digest.update("\0".join(versions).encode())
    return digest.hexdigest()


def cached(spec: dict, fingerprint: str, build: Callable[[], object], allowed: Sequence[type] = ()) -> object:
    """``build()`` once per ``spec``; later calls load it, after checking the fingerprint. The file
    is read by the weights-only unpickler (``load_tensors``): ``allowed`` names the plain-data
    classes the value may contain; a file holding anything else is refused, never run."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "refcache" / f"{key}.pt"
    stored = load_or_set_aside(path, "reference cache", allowed)
    if stored is not None:
        if stored["fingerprint"] != fingerprint:
            raise StaleCacheError(
                f"stale reference cache {path}: built from reference weights {stored['fingerprint'][:12]}, "
                f"but the reference now hashes to {fingerprint[:12]}; delete the file to rebuild it"
            )
        return stored["value"]
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"fingerprint": fingerprint, "spec": spec, "value": value})
    return value
