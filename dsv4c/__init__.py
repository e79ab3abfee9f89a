"""dsv4c's public API: compile a PyTorch module, save it as an artifact, load it back.

    import dsv4c
    c = dsv4c.compile(model, (tokens,), backend="triton", target="sm_90", method="prefill",
                      dynamic={"tokens": {0: "B", 1: "T"}}, output_dir="out/")
    c2 = dsv4c.load("out/")                  # verifies versions and every file's hash
    (logits,) = c2(tokens, params=model.state_dict())

    torch.compile(model, backend="dsv4c", options={"backend": "triton", "target": "cpu"})

Importing dsv4c imports neither Triton, TVM nor torch._dynamo (each loads on first use).
"""

from dsv4c.compiled import Compiled, EntryPoint
from dsv4c.driver import MethodSpec, compile, compile_methods
from dsv4c.errors import ArtifactError, DsvError, InputError, TargetMismatchError, UnavailableError
from dsv4c.loader import load

__all__ = [
    "ArtifactError",
    "Compiled",
    "DsvError",
    "EntryPoint",
    "InputError",
    "MethodSpec",
    "TargetMismatchError",
    "UnavailableError",
    "compile",
    "compile_methods",
    "load",
]
