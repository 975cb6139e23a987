"""Suite-wide set-up, done before any test module imports torch or triton.

- One intra-op thread per process (what torchrun gives each worker): on the 2-core CI machines,
  two OpenMP threads spin against each other and the test processes torchrun starts beside them,
  making the small tensor operations of these tests 10-50x slower.
- Without a GPU, Triton kernels run under Triton's CPU interpreter, which reads TRITON_INTERPRET
  when `@triton.jit` functions are decorated: it must be set before anything (e.g. Megatron-Core)
  imports triton.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
