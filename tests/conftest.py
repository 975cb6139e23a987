"""Suite-wide set-up. Without a GPU, Triton kernels run under Triton's CPU interpreter, which reads
TRITON_INTERPRET when `@triton.jit` functions are decorated: it must be set before anything (e.g.
Megatron-Core) imports triton, so it is set here, before any test module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
