"""The Triton runtime's in-place cache updates (`backends.inplace`): `attn.compress_step` runs its
kernels with the operands' own buffers as outputs (`CompressStepLaunch.update`: the states are
rewritten where they are, the cache gets at most its one new row); `index_put` (a reference op
in this backend) writes its rows with torch. Any device: the position never leaves it."""

from __future__ import annotations

from typing import Any

import ir
from backends.inplace import Writer, index_put_writer
from backends.triton.templates.compress import CompressStepLaunch

__all__ = ["writer"]


def writer(node: ir.Node, launch: Any) -> Writer | None:
    """The in-place writer of `node` run by `launch` (None: a reference op), or None (the
    result is computed as usual and copied into the caller's buffer)."""
    if isinstance(launch, CompressStepLaunch):
        return _compress_step(launch)
    return index_put_writer(node)


def _compress_step(launch: CompressStepLaunch) -> Writer:
    def write(ins: list[Any]) -> tuple[Any, ...]:
        outs = launch.update(ins)
        if outs is not None:
            return outs
        new = launch(ins, {})  # a strided caller buffer: computed as usual, then copied in
        for k, t in zip((10, 2, 3), new):
            ins[k].copy_(t)
        return (ins[10], ins[2], ins[3])

    return write
