"""Hand-written Triton templates for the semantic ops (v4-architecture.md §5), one module per
family; importing a module registers its emitters in `TRITON_EMITTERS`.

| module | ops |
|---|---|
| `attention.py` | `attn.sparse_mqa` (prefill; split-KV decode), `attn.indexer_topk` |
| `attention_sdpa.py` | `attn.sdpa` (dense MHA/GQA/MQA, flash-style online softmax; indexed keys in `attention_sdpa_indexed.py`) |
| `attention_select.py` | `attn.block_select` (NSA block selection: group importance, forced blocks, top-n) |
| `compress.py` | `attn.compress`, `attn.compress_step` |
| `hc.py` | `hc.pre` (Sinkhorn in registers), `hc.post`, `hc.head` |
| `moe.py` | `moe.route`, `moe.experts` |
| `quant.py` | `linalg.matmul_fp8` (block-scaled e4m3 weight decoded after its load; GEMV and `tl.dot` tiles) |

The kernels themselves live as source text (`KernelSource`), so they are content-hashed,
cached and compiled ahead of time like the generated ones; importing this package does not
import triton.
"""

from backends.triton.templates import attention, compress, hc, moe  # noqa: F401
from backends.triton.templates import attention_sdpa  # noqa: F401
from backends.triton.templates import attention_select  # noqa: F401
from backends.triton.templates import quant  # noqa: F401  (linalg.matmul_fp8)
