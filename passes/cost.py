"""Cost model per kernel op: flops and bytes moved, for the roofline report.

A kernel op's cost comes from its op's `cost` (ir), with two kernel-level rules:
- views (reshape, squeeze, unsqueeze, expand) and 0-d constants are free: no launch, no traffic;
- a `fused.kernel` moves only its inputs and outputs (its interior stays in registers); its flops
  are the sum of its body ops' flops (views and constants again free).
Costs are symbolic (dims like `B*T`); `evaluate` binds them to ints. `backend_cost` is the
cost of one backend's kernel for the op: what the kernel op moves, plus what that backend's
kernel split and tiles add (intermediates through device memory, GEMM operands re-read per tile),
so two backends' kernels for one op get their own figures.

    c = kernel_cost(node)                       # Cost(flops, bytes), symbolic
    evaluate(c.bytes, {"B": 1, "T": 4096})      # -> int
    roofline_s(c, {"B": 1, "T": 4096}, peak_flops=989e12, bandwidth=4.8e12)
    backend_cost(node, {"T": 4096}, materialised=..., gemm_tile=(16, 16))  # -> (flops, bytes)
"""

from __future__ import annotations

from collections.abc import Mapping

from ir import Cost, Graph, Node
from ir.symbolic import Dim, canon_dim, subs_dim, sym

__all__ = [
    "FREE",
    "backend_cost",
    "bindings",
    "evaluate",
    "gemm_operand_views",
    "is_free",
    "kernel_cost",
    "roofline_s",
]

FREE = frozenset({"reshape", "squeeze", "unsqueeze", "expand"})


def is_free(node: Node) -> bool:
    """A view or a 0-d constant: no launch and no memory traffic."""
    if node.name in FREE:
        return True
    return node.name == "constant" and not node.operands


def gemm_operand_views(g: Graph) -> set[str]:
    """Results of `permute`s read only as the B operand of GEMMs (`matmul`, or a `fused.kernel`
    whose body starts with one): the GEMM reads B through its strides, so the permute stays a
    view (`x @ w.T` with a [out, in] weight) — no launch, no copy, no buffer."""
    readers: dict[str, list[bool]] = {}
    for n in g.ops:
        body = n.attrs["body"].ops[:1] if n.name == "fused.kernel" else []
        gemm = n.name == "matmul" or [b.name for b in body] == ["matmul"]
        for i, v in enumerate(n.operands):
            ok = gemm and i == 1 and v.type.rank in (2, 3)
            readers.setdefault(v.name, []).append(ok)
    outputs = {v.name for v in g.outputs}
    return {
        n.results[0].name
        for n in g.ops
        if n.name == "permute"
        and n.results[0].name not in outputs
        and all(readers.get(n.results[0].name, [False]))
    }


def kernel_cost(node: Node) -> Cost:
    """Flops and bytes moved by one kernel op (symbolic)."""
    if is_free(node):
        return Cost(0, 0)
    ins = [v.type for v in node.operands]
    outs = [v.type for v in node.results]
    if node.name != "fused.kernel":
        return node.op.cost(ins, outs)
    flops: Dim = 0
    for n in node.attrs["body"].ops:
        flops = flops + kernel_cost(n).flops
    nbytes = sum((t.nbytes for t in (*ins, *outs)), 0)
    return Cost(canon_dim(flops), canon_dim(nbytes))


def bindings(env: Mapping[str, int]) -> dict:
    """{"T": 4096} -> {T: 4096} with the IR's symbols, as `subs_dim` wants."""
    return {sym(k) if isinstance(k, str) else k: int(v) for k, v in env.items()}


def evaluate(d: Dim, env: Mapping) -> int:
    """`d` as an int for the bound symbols (missing symbols raise ValueError naming them)."""
    out = subs_dim(d, bindings(env))
    if not isinstance(out, int):
        missing = ", ".join(sorted(s.name for s in out.free_symbols))
        msg = f"cannot evaluate {d}: bind {missing} (e.g. {{'T': 4096}})"
        raise ValueError(msg)  # noqa: TRY004 (a missing binding, not a wrong type)
    return out


def roofline_s(cost: Cost, env: Mapping, *, peak_flops: float, bandwidth: float) -> float:
    """Lower bound on the kernel's time: the slower of compute and memory at peak rates."""
    return max(evaluate(cost.flops, env) / peak_flops, evaluate(cost.bytes, env) / bandwidth)


def backend_cost(
    node: Node,
    env: Mapping,
    *,
    materialised: Dim = 0,
    gemm_tile: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Flops and bytes of one call of kernel op `node` at `env`, as one backend's kernel runs
    it: `kernel_cost`, plus the intermediates its stages write to device memory and read back
    (`materialised` bytes, counted twice), plus the GEMM operands read again per output tile.
    With (rows, cols) output tiles and no reuse across tiles, each of the ceil(N/cols) column
    tiles reads all of A [.., M, K] and each of the ceil(M/rows) row tiles all of B [.., K, N];
    `kernel_cost` counts each once. Missing bindings raise ValueError (see `evaluate`)."""
    cost = kernel_cost(node)
    flops, nbytes = evaluate(cost.flops, env), evaluate(cost.bytes, env)
    nbytes += 2 * evaluate(materialised, env)
    if gemm_tile is None:
        return flops, nbytes
    rows, cols = gemm_tile
    body = node.attrs["body"].ops if node.name == "fused.kernel" else [node]
    for op in (n for n in body if n.name == "matmul"):
        a, b = (v.type for v in op.operands[:2])
        m, n = evaluate(a.shape[-2], env), evaluate(b.shape[-1], env)
        a_bytes, b_bytes = evaluate(a.nbytes, env), evaluate(b.nbytes, env)
        nbytes += a_bytes * (-(-n // cols) - 1) + b_bytes * (-(-m // rows) - 1)
    return flops, nbytes
