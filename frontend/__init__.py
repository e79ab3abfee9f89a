"""Capture PyTorch programs into the dsv4c IR: `capture` (torch.export and an ATen table) and
`capture_mlir` (the same table, through torch-mlir's `torch` dialect; torch-mlir is imported on
first use).

`translates("ns::op")` registers a translator for a custom op (see `frontend/custom_ops.py` for
what happens to custom ops without one)."""

from frontend.aten import translates
from frontend.capture import CaptureError, UnsupportedOpError, capture
from frontend.mlir import capture_mlir

__all__ = ["CaptureError", "UnsupportedOpError", "capture", "capture_mlir", "translates"]
