"""Graphs of a few ops built from example tensors, shared by the backend tests: each test
compiles one with a backend and compares it with `ir.interpret` (the ops' references)."""

from __future__ import annotations

import torch

import ir

Nodes = list[tuple[str, list[str], dict]]  # (mnemonic, input names, attrs) per op


def tensor_type(t: torch.Tensor) -> ir.TensorType:
    return ir.TensorType(tuple(t.shape), ir.DType.from_torch(t.dtype))


def graph_of(nodes: Nodes, inputs: dict[str, torch.Tensor], name: str = "semantic") -> ir.Graph:
    """One graph: an input per entry of `inputs`, the `nodes` in order, every result an output."""
    b = ir.Builder(name=name)
    vals = {k: b.input(k, tensor_type(v)) for k, v in inputs.items()}
    outs = []
    for mnemonic, names, attrs in nodes:
        r = b.op(mnemonic, [vals[n] for n in names], **attrs)
        outs.extend(r if isinstance(r, tuple) else (r,))
    b.output(*outs)
    return b.build()


def rope_tables(gen: torch.Generator, rows: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of random angles in [0, 6) rad, [rows, half]."""
    angle = torch.rand(rows, half, generator=gen) * 6.0
    return angle.cos(), angle.sin()
