"""Suite-wide set-up, done before any test module imports torch or triton.

- One intra-op thread per process (what torchrun gives each worker): on the 2-core CI machines,
  two OpenMP threads spin against each other and the test processes torchrun starts beside them,
  making the small tensor operations of these tests 10-50x slower.
- Without a GPU, Triton kernels run under Triton's CPU interpreter, which reads TRITON_INTERPRET
  when `@triton.jit` functions are decorated: it must be set before anything (e.g. Megatron-Core)
  imports triton.
- The checkout's root comes off sys.path. `python -m pytest` (make test) puts it first, and there the
  kernels/ folder (installed as moba_train.kernels) would be found as a top-level `kernels`, ahead of
  Hugging Face's hub package of that name, which transformers >= 5.25 requires and imports.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != _ROOT]

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
