"""The op library, one module per family. Importing this package registers every op in `ir.OPS`.

To add an op: write one frozen dataclass with a docstring, `mnemonic`, `kind`, `infer_type` and
`reference` in the family module (or a new module imported here), decorated with `@register`.
"""

from ir.ops import creation, elementwise, fused, index, linalg, reduction, shape  # noqa: F401
from ir.ops import attn, hc, moe  # noqa: F401  (semantic ops: attention, mHC, MoE)
from ir.ops import attn_dense  # noqa: F401  (attn.sdpa: dense MHA/GQA/MQA attention)
from ir.ops import attn_select  # noqa: F401  (attn.block_select: NSA block selection)
from ir.ops import collective  # noqa: F401  (dist.* collectives over mesh axes, MoE EP exchange)
from ir.ops import custom  # noqa: F401  (custom.call: a torch.library op kept whole, not compiled)
from ir.ops import quant  # noqa: F401  (linalg.matmul_fp8: block-scaled FP8 weight GEMM)
