"""dsv4c tests run Triton kernels on the CPU interpreter: it must be on before triton loads.
Compiled kernels go to a per-session cache folder, never the user's."""

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("DSV4C_CACHE_DIR", tempfile.mkdtemp(prefix="dsv4c-test-cache-"))
