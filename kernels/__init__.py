"""Triton kernels for MoBA. Depends on torch and triton only (no Megatron, no configs).

- `moba_attention_triton(q, k, v, cu_seqlens, block_size, topk, softmax_scale=None, shared_gqa_selection=False)`
- `moba_selection_triton(q, k, cu_seqlens, block_size, topk, shared_gqa_selection=False)`

Pipeline: layout.py (varlen block tables) -> gating.py (block means, streaming top-k) -> routing.py
(inverse index: the queries of each key block, per slot) -> forward.py / backward.py (key-block-centric
block-sparse flash attention) -> interface.py (autograd). Design notes and measurements: bench/NOTES.md.
"""

from .gating import moba_selection_triton
from .interface import moba_attention_triton

__all__ = ["moba_attention_triton", "moba_selection_triton"]
