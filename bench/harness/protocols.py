"""The published protocols of the paper tasks as a table: each setting's published value, bench's
default value (read from the built config, so the table cannot drift from the code), and the source.

``bench protocols`` prints it; the README's protocol table is this output (a test keeps them equal).
"""

from __future__ import annotations

from enum import Enum

from omegaconf import ListConfig, OmegaConf

import methods
import tasks
from bench.loops.config import build_config
from tasks.registry import PaperProtocol, Setting

README_BEGIN = "<!-- bench protocols: begin -->"
README_END = "<!-- bench protocols: end -->"


def show(value: object) -> str:
    """A config value as the table writes it: ``0.01``, ``1e-05``, ``true``, ``joy, sadness``."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(show(v) for v in value)
    return "none" if value is None else str(value)


def first_method(task: str) -> str:
    """The method whose config a setting without one is read from: the task's first base method."""
    losses = tasks.get(task).losses
    return next(n for n in methods.names() if methods.get(n).loss in losses)


def bench_value(task: str, setting: Setting) -> str:
    """Bench's default for ``setting`` on ``task`` (its text where no config key holds it)."""
    if not setting.key:
        return setting.bench
    cfg = build_config(task, setting.method or first_method(task))
    node = OmegaConf.select(cfg, setting.key, throw_on_missing=True)
    return show(OmegaConf.to_container(node) if isinstance(node, ListConfig) else node)


def follows(task: str, setting: Setting) -> bool:
    """Whether bench's default equals the published value (``value`` where the text says more)."""
    return bool(setting.key) and bench_value(task, setting) == (setting.value or setting.published)


def protocols() -> dict[str, PaperProtocol]:
    """``{task: protocol}`` for every registered task that follows a published protocol."""
    return {name: tasks.get(name).protocol for name in tasks.names() if tasks.get(name).protocol}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """One Markdown table per paper task: setting, published, bench, source."""
    out = []
    for task, protocol in protocols().items():
        out += [
            f"**{task}** follows `{protocol.name}`: {protocol.source}.",
            "",
            "| setting | published | bench | source |",
            "|---|---|---|---|",
        ]
        for s in protocol.settings:
            bench = bench_value(task, s)
            if s.departs:
                bench = f"{bench} (departs: {s.departs})" if bench else f"departs: {s.departs}"
            key = f" (`{s.key}`)" if s.key else ""
            out.append(
                f"| {_cell(s.what)}{key} | {_cell(s.published)} | {_cell(bench)} | {_cell(s.source)} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"
