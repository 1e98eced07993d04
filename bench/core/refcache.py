"""A content-addressed cache of reference data (offline pairs and their reference log-probs).

Keyed by what produced the data (task config, seed, sampling, labels) and guarded by a fingerprint
of the reference model's weights: every method and radius of a sweep reuses one computation, and
a cache built from other weights under the same key (a rebuilt preset, a changed checkpoint) is
refused loudly instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import torch

from bench.core.artifacts import cache_dir, load_or_set_aside, save_tensors

FULL_HASH_LIMIT = 50_000_000  # parameters; larger models hash a strided sample of every tensor


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
