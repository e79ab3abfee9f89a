"""`fused.kernel`: a region of ops with a nested body graph, produced by fusion passes."""

from __future__ import annotations

from dataclasses import dataclass

from ir.core import Cost, Graph, Kind, Op, register
from ir.symbolic import canon_dim
from ir.types import TensorType


@register
@dataclass(frozen=True)
class FusedKernel(Op):
    """Runs `body` on the operands (body inputs, in order) and returns its outputs. One launch."""

    mnemonic = "fused.kernel"
    kind = Kind.OPAQUE
    num_operands = None
    body: Graph

    def infer_type(self, *operand_types: TensorType):
        want = [v.type for v in self.body.inputs]
        if list(operand_types) != want:
            got = ", ".join(map(str, operand_types))
            raise self.type_error(
                f"operands must match the body inputs ({', '.join(map(str, want))}); got ({got})",
                *operand_types,
            )
        return tuple(v.type for v in self.body.outputs)

    def reference(self, *tensors):
        from ir.interpreter import run_graph

        return run_graph(self.body, list(tensors))

    def cost(self, operand_types, result_types):
        flops = 0
        for n in self.body.ops:
            flops = (
                flops + n.op.cost([v.type for v in n.operands], [v.type for v in n.results]).flops
            )
        nbytes = sum((t.nbytes for t in (*operand_types, *result_types)), 0)
        return Cost(canon_dim(flops), canon_dim(nbytes))
