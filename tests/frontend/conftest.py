"""Frontend tests that compile (zero-sized dims, Hugging Face models) run Triton kernels on the
CPU interpreter: it must be on before triton loads. Kernels go to a per-session cache folder."""

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("DSV4C_CACHE_DIR", tempfile.mkdtemp(prefix="dsv4c-test-cache-"))
