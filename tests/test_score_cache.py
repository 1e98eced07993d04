"""ScoreCache: a JSONL reward-score cache shared by concurrent jobs, some killed mid-write.

The panel is a cheap deterministic fake (scores are a function of the texts; it counts its calls):
what is under test is the cache and the file system, with real processes, locks and SIGKILLs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from tasks.hub import ScoreCache

pytestmark = pytest.mark.timeout(120)
FORK = multiprocessing.get_context("fork")


def heads(prompt: str, response: str, k: int) -> list[float]:
    rng = random.Random(f"{prompt}\0{response}")  # str seeds are stable across processes
    return [rng.uniform(-5, 5) for _ in range(k)]


class FakePanel:
    def __init__(self, k: int = 3, delay: float = 0.0):
        self.names = [f"head{i}" for i in range(k)]
        self.delay = delay
        self.calls: list[list[tuple[str, str]]] = []

    def score(self, prompts, responses):
        self.calls.append(list(zip(prompts, responses, strict=True)))
        if self.delay:
            time.sleep(random.uniform(0, self.delay))
        return expect(list(zip(prompts, responses, strict=True)), len(self.names))

    @property
    def scored(self) -> list[tuple[str, str]]:
        return [pair for call in self.calls for pair in call]


def pairs(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"prompt {i % 7}", f'response {i}\n"quoted" ünïcode') for i in range(start, start + n)]


def expect(ps: list[tuple[str, str]], k: int) -> torch.Tensor:
    return torch.tensor([heads(p, r, k) for p, r in ps], dtype=torch.float64).reshape(len(ps), k)


def score(cache: ScoreCache, ps: list[tuple[str, str]]) -> torch.Tensor:
    return cache.score([p for p, _ in ps], [r for _, r in ps])


def strict_lines(path: Path) -> list[list]:
    """Every line of the file, parsed: fails on any torn or interleaved record."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def quiet_cache(panel, path) -> ScoreCache:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file loads without a word
        return ScoreCache(panel, path)


def test_score_cache_rows_in_order_duplicates_once_and_exact_values(tmp_path):
    path = tmp_path / "scores.jsonl"
    panel = FakePanel(k=4)
    cache = ScoreCache(panel, path)
    assert cache.names == panel.names
    a, b, c, d = pairs(4)
    asked = [c, a, c, b, a]
    out = score(cache, asked)
    assert out.dtype == torch.float64 and out.shape == (5, 4)
    assert torch.equal(out, expect(asked, 4))  # exact: float64 round-trips through JSON
    assert panel.calls == [[c, a, b]]  # each distinct missing pair once, in the order asked
    assert torch.equal(score(cache, [d, a, d]), expect([d, a, d], 4)) and panel.calls[1:] == [[d]]
    assert score(cache, []).shape == (0, 4) and len(panel.calls) == 2
    assert [row[0] for row in strict_lines(path)] == [ScoreCache.key(*p) for p in (c, a, b, d)]

    again = FakePanel(k=4)
    fresh = quiet_cache(again, path)
    assert torch.equal(score(fresh, [a, b, c, d]), expect([a, b, c, d], 4)) and again.calls == []


def test_score_cache_loads_an_old_jsonl_cache(tmp_path):
    path = tmp_path / "armorm-scores" / "old.jsonl"
    path.parent.mkdir()
    ps = pairs(5)
    with open(path, "a") as f:  # the first version's writer, verbatim
        for p, r in ps:
            f.write(json.dumps([ScoreCache.key(p, r), heads(p, r, 3)]) + "\n")
    panel = FakePanel()
    cache = quiet_cache(panel, path)
    assert torch.equal(score(cache, ps), expect(ps, 3)) and panel.calls == []


def _write_pairs(path, ps, k):
    assert torch.equal(score(ScoreCache(FakePanel(k), path), ps), expect(ps, k))


def test_score_cache_picks_up_entries_another_process_wrote_after_it_started(tmp_path):
    path = tmp_path / "scores.jsonl"
    panel = FakePanel()
    cache = ScoreCache(panel, path)  # started first: sees an empty cache
    assert cache.table == {}
    ps = pairs(6)
    child = FORK.Process(target=_write_pairs, args=(path, ps[:4], 3))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert torch.equal(score(cache, ps), expect(ps, 3))
    assert panel.scored == ps[4:]  # what the other process wrote is read, not scored again


def _concurrent_writer(path, universe, seed, k, barrier, results):
    rng = random.Random(seed)
    panel = FakePanel(k, delay=0.002)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = ScoreCache(panel, path)
            barrier.wait()
            for _ in range(60):  # many small writes of overlapping pairs, duplicates within calls
                ask = rng.choices(universe, k=rng.randint(1, 4))
                assert torch.equal(score(cache, ask), expect(ask, k)), "wrong scores"
        results.put((seed, len(panel.scored), [str(w.message) for w in caught]))
    except BaseException as err:  # reported, so that the test fails at once rather than waiting
        results.put((seed, -1, [repr(err)]))


def test_score_cache_concurrent_writers_lose_and_interleave_nothing(tmp_path):
    procs = 5
    path = tmp_path / "scores.jsonl"
    k = 300  # ~6 KB records: several pages per write, so unlocked appends and reads could tear
    universe = pairs(120)
    barrier, results = FORK.Barrier(procs), FORK.Queue()
    workers = [
        FORK.Process(target=_concurrent_writer, args=(path, universe, seed, k, barrier, results))
        for seed in range(procs)
    ]
    start = time.perf_counter()
    for w in workers:
        w.start()
    reports = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    elapsed = time.perf_counter() - start
    assert [w.exitcode for w in workers] == [0] * procs
    assert all(msgs == [] for _, _, msgs in reports), reports  # nobody saw a torn record
    asked = {ScoreCache.key(*p): p for p in universe}
    lines = strict_lines(path)
    keys = [key for key, _ in lines]
    assert len(keys) == len(set(keys)), "a pair was written twice"
    assert set(keys) <= set(asked)
    for key, values in lines:
        assert values == heads(*asked[key], k)
    written = [p for p in universe if ScoreCache.key(*p) in set(keys)]
    panel = FakePanel(k)
    fresh = quiet_cache(panel, path)
    assert torch.equal(score(fresh, written), expect(written, k)) and panel.calls == []
    scored = sum(n for _, n, _ in reports)
    print(f"{procs} writers x 60 calls: {len(lines)} entries, {scored} scorings, {elapsed:.2f}s")


def _killed_mid_record(path, done, torn):
    cache = ScoreCache(FakePanel(), path)
    score(cache, done)
    state = {"calls": 0}

    def write_then_die(fd, data):
        state["calls"] += 1
        if state["calls"] == 2:  # between two partial writes of one append
            os.kill(os.getpid(), signal.SIGKILL)
        record = len(json.dumps([ScoreCache.key(*torn[0]), heads(*torn[0], 3)])) + 1
        return os.write(fd, data[: record + 20])  # the first record whole, 20 bytes of the next

    cache._write = write_then_die
    score(cache, torn)


def test_score_cache_skips_a_record_torn_by_a_writer_killed_mid_write(tmp_path):
    path = tmp_path / "scores.jsonl"
    ps = pairs(7)
    child = FORK.Process(target=_killed_mid_record, args=(path, ps[:5], ps[5:]))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    raw = path.read_bytes()
    assert not raw.endswith(b"\n") and raw.count(b"\n") == 6  # 5 + 1 whole records, then a torn one

    panel = FakePanel()
    with pytest.warns(RuntimeWarning, match=rf"{path.name}:7: skipping an unreadable record"):
        cache = ScoreCache(panel, path)
    assert len(cache.table) == 6
    assert torch.equal(score(cache, ps), expect(ps, 3))
    assert panel.scored == [ps[6]]  # only the torn pair is scored again

    lines = path.read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[7])[0] == ScoreCache.key(*ps[6])  # not glued to the torn one
    again = FakePanel()
    with pytest.warns(RuntimeWarning, match=rf"{path.name}:7: skipping") as caught:
        fresh = ScoreCache(again, path)
    assert len(caught) == 1
    assert torch.equal(score(fresh, ps), expect(ps, 3)) and again.calls == []


def test_score_cache_survives_truncation_at_every_byte_of_the_last_record(tmp_path):
    ps = pairs(4)
    whole = tmp_path / "whole.jsonl"
    score(ScoreCache(FakePanel(), whole), ps)
    raw = whole.read_bytes()
    start = raw.rindex(b"\n", 0, len(raw) - 1) + 1
    assert start > 0
    for cut in range(start, len(raw)):
        path = tmp_path / f"cut{cut}.jsonl"
        path.write_bytes(raw[:cut])
        panel = FakePanel()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = ScoreCache(panel, path)
            out = score(cache, ps)
        torn = start < cut < len(raw) - 1  # cut == len(raw) - 1 loses only the newline: still whole
        assert [str(w.message) for w in caught] == (
            [f"{path}:4: skipping an unreadable record (torn by a killed writer, or garbage)"] if torn else []
        )
        assert torch.equal(out, expect(ps, 3))
        assert panel.scored == ([ps[3]] if cut < len(raw) - 1 else [])
        again = FakePanel()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh = ScoreCache(again, path)
        assert len(caught) == int(torn)
        assert torch.equal(score(fresh, ps), expect(ps, 3)) and again.calls == []


def _tight_loop(path, k, start):
    cache = ScoreCache(FakePanel(k), path)
    # Short writes (as os.write may do) spread each append over many system calls, so the SIGKILL
    # below often lands inside a record: the real write loop and the real signal.
    cache._write = lambda fd, data: os.write(fd, data[:64])
    i = start
    while True:
        score(cache, pairs(1, i))
        i += 1


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def test_score_cache_after_real_sigkills_of_a_writer_in_a_tight_loop(tmp_path):
    path = tmp_path / "scores.jsonl"
    k = 3000  # ~60 KB records: a SIGKILL can land inside one write
    kills, torn, done = 4, 0, []
    sequences = [pairs(1000, 1000 * r) for r in range(kills)]  # what the writer of each round scores
    pair_of = {ScoreCache.key(*p): p for seq in sequences for p in seq}
    for round_ in range(kills):
        child = FORK.Process(target=_tight_loop, args=(path, k, 1000 * round_))
        child.start()
        deadline = time.monotonic() + 30
        base = path.stat().st_size if path.exists() else 0
        while not (size := path.stat().st_size if path.exists() else 0) > base + 300_000 or (
            _last_byte(path, size) == b"\n" and time.monotonic() < deadline - 20  # kill mid-record if seen
        ):
            assert time.monotonic() < deadline and child.is_alive()
            time.sleep(0.0002)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = ScoreCache(FakePanel(k), path)
        assert len(caught) <= torn + 1  # at most one torn record per kill
        torn = len(caught)
        assert all(v == heads(*pair_of[key], k) for key, v in cache.table.items())  # loaded entries are exact
        n = sum(ScoreCache.key(*p) in cache.table for p in sequences[round_])
        assert n >= 3 and all(ScoreCache.key(*p) in cache.table for p in sequences[round_][:n])
        done.append(n)  # a prefix of what the writer scored: only its last record may be lost

    panel = FakePanel(k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ScoreCache(panel, path)
    assert len(caught) == torn and all("skipping an unreadable record" in str(w.message) for w in caught)
    asked = [p for seq, n in zip(sequences, done, strict=True) for p in seq[: n + 1]]
    assert torch.equal(score(cache, asked), expect(asked, k))
    assert panel.scored == [seq[n] for seq, n in zip(sequences, done, strict=True)]  # only the unfinished
    again = FakePanel(k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = ScoreCache(again, path)
    assert len(caught) == torn and torch.equal(score(fresh, asked), expect(asked, k)) and again.calls == []
    print(f"{kills} SIGKILLs: {len(fresh.table)} entries of {k} heads kept, {torn} torn records skipped")


def test_score_cache_skips_garbage_and_wrong_head_counts_in_the_middle(tmp_path):
    path = tmp_path / "scores.jsonl"
    ps = pairs(4)
    good = [json.dumps([ScoreCache.key(*p), heads(*p, 3)]).encode() for p in ps]
    path.write_bytes(
        b"\n".join(
            [
                good[0],
                b"this is not json {",
                json.dumps([ScoreCache.key(*ps[1]), heads(*ps[1], 2)]).encode(),  # 2 heads, not 3
                good[1],
                b"",
                b"\xff\xfe not utf-8",
                b'["only a key"]',
                good[2],
                good[3][:40] + good[3][-30:],  # a record with a hole in it
                good[3],
            ]
        )
        + b"\n"
    )
    panel = FakePanel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ScoreCache(panel, path)
    messages = [str(w.message) for w in caught]
    assert [m.split(": skipping")[0] for m in messages] == [f"{path}:{n}" for n in (2, 3, 6, 7, 9)]
    assert "2 heads, not 3" in messages[1]
    assert torch.equal(score(cache, ps), expect(ps, 3)) and panel.calls == []
    assert torch.equal(score(cache, pairs(1, 9)), expect(pairs(1, 9), 3)) and panel.calls == [pairs(1, 9)]
