"""fuse_elementwise keeps each absorbed op's source location inside the `fused.kernel` body, so the
IR dump and the kernel records name the lines a kernel fuses (issue 17); locations stay out of the
kernel's structural signature, so identical layers still share one kernel."""

from __future__ import annotations

import ir
import passes
from ir import DType, TensorType
from passes.fuse_elementwise import fuse_elementwise

F32 = DType.f32


def norm_then_gate(layers: int) -> ir.Graph:
    """Per layer (its own input and output) an RMSNorm (norm.py:10-12) whose result is gated by
    sigmoid (act.py:7)."""
    b = ir.Builder(name="blocks")
    outs = []
    for i in range(layers):
        h = b.input(f"h{i}", TensorType((ir.sym("T"), 16), F32))
        norm, act = ir.Loc(f"layers.{i}.norm", "norm.py:10"), ir.Loc(f"layers.{i}.act", "act.py:7")
        ms = b.op("mean", [b.op("mul", [h, h], loc=norm)], dims=[-1], keepdim=True, loc=norm)
        eps = b.constant(1e-6, F32, loc=ir.Loc(f"layers.{i}.norm", "norm.py:11"))
        r = b.op("rsqrt", [b.op("add", [ms, eps], loc=norm)], loc=norm)
        y = b.op("mul", [h, r], loc=ir.Loc(f"layers.{i}.norm", "norm.py:12"))
        outs.append(b.op("mul", [y, b.op("sigmoid", [y], loc=act)], loc=act))
    b.output(*outs)
    return b.build()


def test_body_ops_keep_their_locations_and_the_dump_shows_them() -> None:
    out = fuse_elementwise(norm_then_gate(1))
    ir.verify(out)
    (kernel,) = [n for n in out.ops if n.name == "fused.kernel"]
    body = kernel.attrs["body"]
    sources = [n.loc.source if n.loc else None for n in body.ops]
    assert None not in sources, ir.to_text(out)
    assert {"norm.py:10", "norm.py:11", "norm.py:12", "act.py:7"} == set(sources)
    assert [n.loc.module for n in body.ops if n.name == "sigmoid"] == ["layers.0.act"]
    text = ir.to_text(out)
    assert "# layers.0.norm @ norm.py:12" in text and "# layers.0.act @ act.py:7" in text, text


def test_layers_still_share_one_kernel_signature() -> None:
    out = fuse_elementwise(norm_then_gate(3))
    kernels = [n for n in out.ops if n.name == "fused.kernel"]
    assert len(kernels) == 3
    assert len({passes.op_signature(k) for k in kernels}) == 1
    modules = {n.loc.module for k in kernels for n in k.attrs["body"].ops if n.name == "sigmoid"}
    assert modules == {f"layers.{i}.act" for i in range(3)}  # each body names its own site


def test_kernel_record_locations_name_every_fused_line() -> None:
    from backends.naming import locations

    (kernel,) = [n for n in fuse_elementwise(norm_then_gate(1)).ops if n.name == "fused.kernel"]
    got = locations(kernel.attrs["body"].ops, kernel.loc)
    assert sorted(got) == ["act.py:7", "norm.py:10", "norm.py:11", "norm.py:12"], got
