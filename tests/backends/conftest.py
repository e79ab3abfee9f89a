"""Triton kernels in these tests run on the CPU interpreter: it must be on before triton loads."""

import os

os.environ["TRITON_INTERPRET"] = "1"
