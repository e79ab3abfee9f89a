"""Triton kernels in these tests run on the CPU interpreter: it must be on before triton loads."""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).parent))  # for `import bodies`
