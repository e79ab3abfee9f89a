"""`run_ranks`: start N local ranks (gloo on CPU), run a function on each, collect results.

A rank that raises or dies makes the call fail with `RankFailed` naming the rank and its error;
the surviving ranks see the broken connection (or the process-group timeout) and stop — the
launcher terminates any still running after a grace period, so nothing hangs.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """One or more ranks raised, died or timed out; the message has each rank's story."""


def _worker(rank: int, world: int, store: str, timeout_s: float, fn, args, results) -> None:
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        out = fn(rank, *args)
        results.put((rank, "ok", _tree(out, _to_numpy)))
    except BaseException as e:  # report everything, then exit non-zero
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 60.0,
    grace_s: float = 10.0,
) -> list[Any]:
    """Run `fn(rank, *args)` in `world_size` spawned processes; returns results by rank.

    `fn` must be importable (spawn). `timeout_s` bounds every collective (the process group's
    timeout) and the whole run; `grace_s` is how long the others get after one rank fails."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dsv4c_ranks_") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store, timeout_s, fn, args, results),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s, grace_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(5)


def _collect(procs, results, world: int, timeout_s: float, grace_s: float) -> list[Any]:
    got: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s + grace_s
    failed_at: float | None = None
    order: list[int] = []  # ranks in the order their failure was seen
    while len(got) < world:
        while not results.empty():
            rank, status, payload = results.get()
            got[rank] = (status, payload)
            if status != "ok":
                failed_at, order = failed_at or time.monotonic(), order + [rank]
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
        for r in dead:
            got[r] = ("died", f"exit code {procs[r].exitcode} before reporting")
            failed_at, order = failed_at or time.monotonic(), order + [r]
        now = time.monotonic()
        if failed_at is not None and now - failed_at > grace_s or now > deadline:
            break
        if len(got) < world:
            time.sleep(0.02)
    bad = {r: v for r, v in got.items() if v[0] != "ok"}
    missing = [r for r in range(world) if r not in got]
    if bad or missing:
        lines = [f"rank {r} {s}: {_first_line(p)}" for r, (s, p) in sorted(bad.items())]
        lines += [f"rank {r}: no result (terminated after the failure or the {timeout_s:.0f} s "
                  "timeout)" for r in missing]
        detail = "\n".join(f"--- rank {r} ---\n{p}" for r, (s, p) in sorted(bad.items()))
        cause = _culprit(bad, order)
        head = (f"cause: rank {cause} {got[cause][0]} ({_first_line(got[cause][1])})"
                if cause is not None else f"no result within the {timeout_s:.0f} s timeout")
        raise RankFailed(f"{len(bad) + len(missing)} of {world} ranks failed; {head}:\n"
                         + "\n".join(lines) + "\n" + detail)
    return [_tree(got[r][1], _to_torch) for r in range(world)]


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _culprit(bad: dict[int, tuple[str, Any]], order: list[int]) -> int | None:
    """The rank that most likely caused the failure, whatever order the reports arrived in: one
    that died without reporting, else one whose error is not a lost peer, else the first seen."""
    died = [r for r in order if bad[r][0] == "died"]
    own = [r for r in order if not any(m in str(bad[r][1]) for m in _PEER_LOST)]
    return (died or own or order or [None])[0]


def _first_line(payload: Any) -> str:
    text = str(payload).strip()
    return text.splitlines()[0] if text else "(no message)"


def _tree(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """Map `leaf` over tensors/arrays inside lists, tuples and dicts."""
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
        return leaf(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree(x, leaf) for x in obj)
    if isinstance(obj, dict):
        return {k: _tree(v, leaf) for k, v in obj.items()}
    return leaf(obj)


def _to_numpy(x: Any) -> Any:
    # tensors travel by value: torch's shared-memory handles die with the rank's process
    if isinstance(x, torch.Tensor):
        return ("__tensor__", x.detach().cpu().contiguous().numpy().copy())
    return x


def _to_torch(x: Any) -> Any:
    if isinstance(x, tuple) and len(x) == 2 and x[0] == "__tensor__":
        return torch.from_numpy(x[1])
    return x
