"""A content-addressed cache of reference data (offline pairs and their reference log-probs, the
head scaler and the iteration-0 evaluation).

Keyed by what produced the data (task config, seed, sampling, labels; for the evaluation also a
fingerprint of the code that computes it) and guarded by a fingerprint of the reference model's
weights: every method and radius of a sweep reuses one computation, and a cache built from other
weights under the same key (a rebuilt preset, a changed checkpoint) is refused loudly instead of
silently reused.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
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


def module_source(module: str) -> Path | None:
    """The repository file of ``module`` (``a.b``: ``a/b.py`` or ``a/b/__init__.py``), None for a
    module from elsewhere (the standard library, an installed package) or a name that is no module."""
    base = REPO.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def imported_modules(path: Path) -> set[str]:
    """The absolute module names the source at ``path`` imports anywhere in it (imports inside
    functions included); ``from a import b`` names both ``a`` and ``a.b``, which may be a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def code_closure(roots: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The repository files of ``roots`` and of every repository module they import, transitively
    (sorted), and the top-level names of the other packages those files import (sorted)."""
    files: dict[str, Path] = {}
    outside: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in files:
            continue
        path = module_source(name)
        if path is not None:
            files[name] = path
            todo.extend(imported_modules(path))
        elif module_source(name.split(".")[0]) is None:  # not ``repo_module.attribute``
            outside.add(name.split(".")[0])
    return sorted(set(files.values())), sorted(outside)


def code_fingerprint(roots: Sequence[str], leaves: Sequence[str] = ()) -> str:
    """SHA-256 of the source of ``roots`` and of every repository module they import, transitively,
    of the modules ``leaves`` (their own file only), and of the installed version of each package
    those files import whose import name is its distribution's (torch, transformers, numpy): a
    value cached by other code (an edited reward or sampler, another torch) is never read back."""
    files, outside = code_closure(roots)
    files = sorted({*files, *(p for p in map(module_source, leaves) if p is not None)})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(REPO)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for name in outside:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}\0".encode())
        except importlib.metadata.PackageNotFoundError:  # the standard library, or another name
            continue
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
