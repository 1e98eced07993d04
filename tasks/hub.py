"""Shared machinery of the Hub-backed paper tasks (emotion, armorm, hh).

* loading datasets and models through ``datasets`` / ``from_pretrained``, or from a local path (the
  tests' stand-ins), failing at once with what to download and how when the Hub is unreachable;
* reward panels: K named heads scored in batches (``score(prompts, responses) -> [N, K]``);
* ``PromptTask``: the interface the training loop uses (prompt splits, panel, mixture protocol,
  sampling settings, policy preset).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from bench.core.lm import Sampling
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import Protocol
from tasks.registry import Setting


class HubUnavailable(RuntimeError):
    """A dataset or model the task needs could not be loaded; the message says how to get it."""


def _offline_hint() -> str:
    flags = [f for f in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(f) == "1"]
    return f" ({', '.join(flags)} is set)" if flags else ""


def load_splits(
    name: str, splits: dict[str, str], config: str | None = None, data_dir: str | None = None
) -> dict[str, list[dict]]:
    """``{our split: rows}`` from a Hub dataset (its ``data_dir`` folder if given), or from
    ``NAME[/DATA_DIR]/<split>.jsonl`` files when ``name`` is a local folder. Offline or unreachable:
    ``HubUnavailable`` naming the download command.
    """
    from datasets import load_dataset

    local = Path(name)
    try:
        if local.is_dir():
            folder = local / data_dir if data_dir else local
            files = {ours: str(folder / f"{theirs}.jsonl") for ours, theirs in splits.items()}
            ds = load_dataset("json", data_files=files)
            return {ours: list(ds[ours]) for ours in splits}
        ds = load_dataset(name, config, data_dir=data_dir)
        return {ours: list(ds[theirs]) for ours, theirs in splits.items()}
    except (ConnectionError, OSError, ValueError) as err:
        raise HubUnavailable(
            f"dataset {name} is not available{_offline_hint()}: with network, run "
            f"`huggingface-cli download --repo-type dataset {name}` (or let `datasets` fetch it once) and "
            f"keep HF_HOME on the nodes; or set the task's dataset to a local folder of <split>.jsonl files. "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def from_pretrained(loader, model_id: str, what: str, **kwargs):
    """``loader.from_pretrained`` with an actionable error when the weights cannot be had."""
    try:
        return loader.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise HubUnavailable(
            f"{what} {model_id} is not available{_offline_hint()}: with network, run "
            f"`huggingface-cli download {model_id}` (gated models need `huggingface-cli login` and an "
            f"accepted licence), or point the task at a local copy. ({str(err).splitlines()[0]})"
        ) from None


def load_causal_lm(model_id: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = from_pretrained(AutoTokenizer, model_id, "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return from_pretrained(AutoModelForCausalLM, model_id, "policy model", dtype=dtype), tok


def reward_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def frozen_dtype() -> torch.dtype:
    """Frozen reward models: bf16 on a CUDA device that has it (half the memory; scores are read
    in fp32), fp32 on CPU."""
    cuda = reward_device().type == "cuda"
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


class SequenceClassifierPanel:
    """Heads from one sequence classifier: ``transform(logits)`` per head (sigmoid or identity).

    ``text`` chooses what is scored: ``response`` (the emotion classifier reads the response only)
    or ``dialogue`` (prompt and response joined as ``template``).
    """

    def __init__(
        self,
        model_id: str,
        names: list[str],
        *,
        transform: str = "sigmoid",
        text: str = "response",
        template: str = "{prompt}{response}",
        batch_size: int = 32,
        dtype: torch.dtype | None = None,  # default: bf16 on CUDA (frozen), fp32 on CPU
        max_length: int = 512,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.names, self.transform, self.text, self.template = list(names), transform, text, template
        self.batch_size, self.max_length = batch_size, max_length
        self.tok = from_pretrained(AutoTokenizer, model_id, "reward tokenizer")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = from_pretrained(
            AutoModelForSequenceClassification, model_id, "reward model", dtype=dtype or frozen_dtype()
        )
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.model.to(reward_device()).eval()
        if self.model.config.num_labels < len(self.names):
            raise ValueError(
                f"reward model {model_id} has {self.model.config.num_labels} labels, "
                f"fewer than the {len(self.names)} heads {self.names}"
            )

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """``[N, heads]`` rewards; an empty text (a response that is only EOS) is scored as the EOS
        token, since a classifier needs at least one token to read."""
        texts = (
            responses
            if self.text == "response"
            else [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        )
        texts = [t or self.tok.eos_token for t in texts]
        out = []
        device = next(self.model.parameters()).device
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[lo : lo + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(device)
            logits = self.model(**enc).logits.float()[:, : len(self.names)]
            out.append(torch.sigmoid(logits) if self.transform == "sigmoid" else logits)
        return torch.cat(out).double().cpu()


class StackedPanel:
    """Several single-output reward models, one head each (e.g. helpful and harmless)."""

    def __init__(self, panels: list[SequenceClassifierPanel]):
        self.panels = panels
        self.names = [p.names[0] for p in panels]

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        return torch.cat([p.score(prompts, responses) for p in self.panels], dim=1)


class ScoreCache:
    """A persistent ``(prompt, response) -> heads`` cache in front of a costly panel (ArmoRM).

    The store is one append-only JSONL file, ``[key, [head, ...]]`` a line (the format of the first
    version, so older caches load as they are), shared by concurrent jobs (SLURM array tasks):

    * **Writers** append under an exclusive ``flock`` on ``<file>.lock`` (plus a per-path thread lock,
      since NFS turns ``flock`` into per-process POSIX locks): under it they re-read what others wrote
      meanwhile, keep only the pairs still missing (no entry is written twice), and append them as whole
      lines in one write loop, then ``fsync``. The lock, not ``O_APPEND``, is what serializes appends:
      ``O_APPEND`` is not atomic on NFS. If the file does not end with a newline (a writer was killed
      mid-record), the append starts with one, so a torn record costs itself and never the next one.
    * **Readers** parse new bytes only (a byte offset is kept) under a shared lock, so nothing they see is
      in the middle of being written; they re-read before scoring what is missing, so concurrent cells
      share work. A line that does not parse (torn by a SIGKILL at a job's time limit, or garbage) or has
      the wrong number of heads is skipped with a ``RuntimeWarning`` naming the file and line: a lost
      entry only costs a re-score. For duplicate keys the first line wins.

    Why not SQLite: its WAL mode needs shared memory on one host and is unsafe on network folders, and
    in rollback mode a broken lock there can corrupt the whole database; here the worst case is one
    skipped line. Why not a file per writer: thousands of array tasks make thousands of files to list
    and merge on every read. Where the folder cannot lock (``flock`` fails), it warns once and appends
    unlocked: a line interleaved by that is skipped like a torn one.
    """

    _thread_locks: ClassVar[dict[str, threading.Lock]] = {}
    _thread_locks_guard: ClassVar[threading.Lock] = threading.Lock()
    _write = staticmethod(os.write)  # the write path's one system call (tests kill a writer inside it)

    def __init__(self, panel, path: Path):
        self.panel, self.names, self.path = panel, panel.names, Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.table: dict[str, list[float]] = {}
        self._offset = 0  # bytes of whole lines parsed so far
        self._line = 0  # lines parsed so far
        self._file_id: tuple[int, int] | None = None
        self._torn_at: int | None = None  # offset of an unterminated last record already warned about
        self._lock_warned = False
        with ScoreCache._thread_locks_guard:
            self._thread_lock = ScoreCache._thread_locks.setdefault(
                os.path.abspath(self.path), threading.Lock()
            )
        self.refresh()

    @staticmethod
    def key(prompt: str, response: str) -> str:
        return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        keys = [self.key(p, r) for p, r in zip(prompts, responses, strict=True)]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)  # one scoring per distinct pair, in the order asked
        todo = [i for k, i in first.items() if k not in self.table]
        if todo:
            self.refresh()  # other jobs may have scored some of them since
            todo = [i for k, i in first.items() if k not in self.table]
        if todo:
            fresh = torch.as_tensor(
                self.panel.score([prompts[i] for i in todo], [responses[i] for i in todo]),
                dtype=torch.float64,
            )
            if tuple(fresh.shape) != (len(todo), len(self.names)):
                raise ValueError(
                    f"the panel scored {len(todo)} pairs as {tuple(fresh.shape)}, "
                    f"not ({len(todo)}, {len(self.names)})"
                )
            self._append({keys[i]: row for i, row in zip(todo, fresh.tolist(), strict=True)})
        rows = [self.table[k] for k in keys]
        return torch.tensor(rows, dtype=torch.float64).reshape(len(keys), len(self.names))

    def refresh(self) -> None:
        """Parse what was appended to the file since the last look (by any process)."""
        with self._locked(exclusive=False):
            self._read_new()

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with self._thread_lock:
            try:
                if exclusive:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                if exclusive:
                    raise
                fd = None  # no folder yet (nothing to read), or a read-only one: read unlocked
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                    except OSError as err:
                        if not self._lock_warned:
                            self._lock_warned = True
                            warnings.warn(
                                f"score cache {self.lock_path}: cannot lock ({err}); going on unlocked",
                                RuntimeWarning,
                                stacklevel=4,
                            )
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # releases the lock

    def _read_new(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            st = os.fstat(fd)
            if self._file_id not in (None, (st.st_dev, st.st_ino)) or st.st_size < self._offset:
                warnings.warn(
                    f"score cache {self.path} was replaced or truncated: reading it again",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._offset = self._line = 0
                self._torn_at = None
            self._file_id = (st.st_dev, st.st_ino)
            os.lseek(fd, self._offset, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        data, pos = b"".join(chunks), 0
        while (end := data.find(b"\n", pos)) >= 0:
            self._parse(data[pos:end], self._offset + pos)
            self._line += 1
            pos = end + 1
        self._offset += pos
        if data[pos:].strip():
            # No writer holds the lock, so an unterminated last record was torn (its writer was
            # killed). Left unparsed: the next append ends it with a newline, and it is read then.
            self._parse(data[pos:], self._offset)

    def _parse(self, line: bytes, at: int) -> None:
        if not line.strip():
            return
        why = None
        try:
            record = json.loads(line)
        except ValueError:
            why = "an unreadable record (torn by a killed writer, or garbage)"
        else:
            if not (isinstance(record, list) and len(record) == 2 and isinstance(record[0], str)):
                why = "a line that is not a [key, heads] record"
            elif not isinstance(record[1], list) or len(record[1]) != len(self.names):
                n = len(record[1]) if isinstance(record[1], list) else "no list of"
                why = f"a record with {n} heads, not {len(self.names)}"
            elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record[1]):
                why = "a record with non-numeric heads"
        if why is None:
            self.table.setdefault(record[0], [float(v) for v in record[1]])
        elif at != self._torn_at:  # warn once for a torn last record, not again once it is ended
            self._torn_at = at
            warnings.warn(f"{self.path}:{self._line + 1}: skipping {why}", RuntimeWarning, stacklevel=4)

    def _append(self, rows: dict[str, list[float]]) -> None:
        with self._locked(exclusive=True):
            self._read_new()  # what others wrote meanwhile wins, and is not written again
            new = {k: v for k, v in rows.items() if k not in self.table}
            if not new:
                return
            self.table.update(new)
            data = "".join(json.dumps([k, v]) + "\n" for k, v in new.items()).encode()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # end a record torn by a killed writer: this one starts a line
                view = memoryview(data)
                while view:
                    view = view[self._write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)


# The training defaults of the DRO-REBEL code's single-GPU path (Emotion and ArmoRM): torch's AdamW
# at lr 1e-5 with its default weight decay 0.01, no warm-up, no scheduler, no gradient clipping, an
# evaluation every 50 iterations; log-probs of raw logits for every method (src/utils.py). bench
# adds checkpoints (they change no number).
DRO_REBEL_DEFAULTS = (
    "train.lr=1e-5",
    "train.weight_decay=0.01",
    "train.warmup=0",
    "train.grad_clip=0",
    "train.eval_every=50",
    "train.checkpoint_every=10",
    "method.logp_temperature=1.0",
)

# Those settings in the protocol tables (bench protocols), with their place in the DRO-REBEL code.
DRO_REBEL_SETTINGS = (
    Setting(
        "weight decay",
        "0.01 (torch's AdamW default)",
        "src/models/rebel_optimizers.py:144",
        "train.weight_decay",
        value="0.01",
    ),
    Setting("warm-up steps", "0", "src/models/rebel_optimizers.py:126-128", "train.warmup"),
    Setting("gradient clipping (0: none)", "0", "src/models/rebel_optimizers.py:126-128", "train.grad_clip"),
    Setting("log-prob temperature", "1", "src/utils.py:44-50", "method.logp_temperature", "rebel"),
)

# The training defaults of the task with no published protocol (hh).
PAPER_DEFAULTS = (
    "train.iterations=100",
    "train.batch_size=64",
    "train.lr=1e-5",
    "train.eval_every=50",
    "train.checkpoint_every=10",
    "train.grad_clip=1.0",
    "train.warmup=10",
)


@dataclass
class PromptTask:
    """What the training loop needs from a task; the paper tasks build one from their config."""

    splits: dict[str, list[Prompt]]
    panel: object  # .names and .score(prompts, responses) -> [N, K]
    protocol: Protocol
    sampling: Sampling
    policy_id: str
    standardize: bool = True

    @property
    def names(self) -> list[str]:
        return list(self.panel.names)

    def prompts(self, split: str) -> list[Prompt]:
        return self.splits[split]

    def load_policy(self):
        return load_causal_lm(self.policy_id)

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        return self.panel.score(prompts, responses)


def take(rows: list[Prompt], n: int, what: str) -> list[Prompt]:
    if n > len(rows):
        raise ValueError(f"{what} = {n} exceeds the {len(rows)} prompts available")
    return rows[:n]


def shuffled(rows: list, seed: int) -> list:
    """``rows`` in the order of Python's ``random.Random(seed).shuffle`` (the DRO-REBEL ArmoRM code's
    draw of its prompt pools), a new list."""
    out = list(rows)
    random.Random(seed).shuffle(out)
    return out
