"""Capture PyTorch programs into the dsv4c IR (`capture`), via torch.export and an ATen table."""

from frontend.capture import CaptureError, UnsupportedOpError, capture

__all__ = ["CaptureError", "UnsupportedOpError", "capture"]
