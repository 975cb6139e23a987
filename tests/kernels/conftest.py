"""Run the kernel tests compiled on a CUDA machine, and on CPU under the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU before anything imports triton
(the interpreter flag is read when `@triton.jit` decorates a function). On a GPU machine the same tests
run the compiled kernels (`python -m pytest tests/kernels` there); a CPU machine with the interpreter
turned off skips them.

Under the interpreter, `moba_train.kernel_compile.patch_interpreter_for_numpy2` makes Triton 3.6's interpreter
take numpy 2.
"""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    collect_ignore = ["test_moba_triton.py"]
elif INTERPRETED:
    from moba_train.kernel_compile import patch_interpreter_for_numpy2

    patch_interpreter_for_numpy2()
