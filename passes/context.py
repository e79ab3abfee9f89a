"""`PassContext`: options, debug switches, counters and timings handed to every pass.

No globals: the pipeline reads the environment once (`PassContext.from_env`) and passes the
context down. Switches (documented in the README's "Debug switches" table):

- `DEBUG_IR=1`    print the graph after each pass;
- `VERIFY_EACH=1` run `ir.verify` after each pass (a failure names the pass);
- `STATS=1`       print per-rule hit and near-miss counts and per-pass times when the pipeline
                  ends.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import ir

__all__ = ["Pass", "PassContext", "env_flag"]

Pass = Callable[[ir.Graph, "PassContext"], ir.Graph]


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A switch is on unless unset, empty, `0`, `false` or `no`."""
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run."""

    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    debug_ir: bool = False
    verify_each: bool = False
    stats: bool = False
    counters: Counter[str] = field(default_factory=Counter)
    near_misses: Counter[str] = field(default_factory=Counter)  # rule name -> near misses
    times: dict[str, float] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)  # name -> Rule, every rule a driver ran
    products: dict[str, Any] = field(default_factory=dict)  # what passes make besides the graph
    stream: TextIO | None = None  # None: sys.stderr at the time of writing

    @classmethod
    def from_env(
        cls,
        *,
        target: str | None = None,
        options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
    ) -> PassContext:
        env = os.environ if env is None else env
        return cls(
            target=target,
            options=dict(options or {}),
            debug_ir=env_flag(env, "DEBUG_IR"),
            verify_each=env_flag(env, "VERIFY_EACH"),
            stats=env_flag(env, "STATS"),
            stream=stream,
        )

    def count(self, key: str, n: int = 1) -> None:
        """Add `n` to counter `key` (rule names, `cse`, `dce`, ...)."""
        if n:
            self.counters[key] += n

    def log(self, msg: str) -> None:
        print(msg, file=self.stream or sys.stderr)

    def run(self, name: str, fn: Pass, graph: ir.Graph) -> ir.Graph:
        """Run one pass: time it, then print (DEBUG_IR) and verify (VERIFY_EACH) its output."""
        start = time.perf_counter()
        out = fn(graph, self)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        if self.debug_ir:
            self.log(f"// ----- after {name}: {len(out.ops)} ops -----\n{ir.to_text(out)}")
        if self.verify_each:
            try:
                ir.verify(out)
            except ir.VerifyError as e:
                raise ir.VerifyError(f"after pass {name}:\n{e}") from None
        return out

    def report(self) -> str:
        """Per-pass times and per-rule hit counts, as printed by STATS=1."""
        lines = ["pass times:"]
        for name, t in self.times.items():
            lines.append(f"  {name:<32} {t * 1000:10.1f} ms")
        lines.append("rule hits:")
        for key, n in sorted(self.counters.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {key:<32} {n:10d}")
        if not self.counters:
            lines.append("  (none)")
        if self.near_misses:
            lines.append("near misses (one check short; `dsv4c ir --explain RULE` says which):")
            for key, n in sorted(self.near_misses.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {key:<32} {n:10d}")
        idle = sorted(name for name in self.rules if not self.counters[name])
        if idle:
            lines.append(
                f"rules that never fired ({len(idle)}; `passes.explain(rule, graph)` says why):"
            )
            lines.append(
                textwrap.fill(", ".join(idle), 100, initial_indent="  ", subsequent_indent="  ")
            )
        return "\n".join(lines)
