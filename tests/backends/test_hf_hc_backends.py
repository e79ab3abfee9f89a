"""The mHC ops fused from Hugging Face's DeepSeek-V4 spelling (`Streams` of
tests/passes/hf_hc_modules.py: two HF hyper-connection mixes and HF's head), compiled by TVM (llvm)
and by Triton (CPU interpreter), equal HF eager in fp32, every hc op run as a kernel of the
backend. TVM's build takes ~20 s on 2 busy cores: DSV4C_SLOW=1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import passes
from frontend import capture

pytest.importorskip("transformers.models.deepseek_v4")
sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from hf_hc_modules import Streams, hf_config, hidden, params  # noqa: E402  (after the path)


def _backend(name: str):
    if name == "tvm":
        pytest.importorskip("tvm")
        from backends.tvm import TVMBackend

        return TVMBackend()
    from backends.triton import TritonBackend

    return TritonBackend()


SLOW = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~20 s TVM build; DSV4C_SLOW=1")


@pytest.mark.parametrize("backend", [pytest.param("tvm", marks=SLOW), "triton"])
def test_hf_hc_compiles_equal_to_eager(backend: str) -> None:
    module = Streams(hf_config(3)).eval()
    g = passes.pipeline(capture(module, (hidden(),)))
    hc = [n for n in g.ops if n.name.startswith("hc.")]
    assert sorted(n.name for n in hc) == ["hc.head", "hc.post", "hc.post", "hc.pre", "hc.pre"]
    exe = _backend(backend).compile(g, "cpu")
    (got,) = exe(hidden(), params=params(module))
    with torch.no_grad():
        want = module(hidden())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = exe.report()
    assert {"hc.pre", "hc.post", "hc.head"} <= {op for k in report["kernels"] for op in k["ops"]}
    assert not [f for f in report["fallbacks"] if f["op"].startswith("hc.")], report["fallbacks"]
