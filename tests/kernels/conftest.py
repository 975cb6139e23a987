"""Run the kernel tests compiled on a CUDA machine, and on CPU under the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU before anything imports triton
(the interpreter flag is read when `@triton.jit` decorates a function). On a GPU machine the same tests
run the compiled kernels (`python -m pytest tests/kernels` there); a CPU machine with the interpreter
turned off skips them.

Triton 3.6's interpreter holds scalars as 1-element numpy arrays and converts them with
`int(array)`, which numpy 2 rejects, so `range(0, n)` with a runtime `n` (e.g. loaded from memory)
fails under the interpreter although it compiles on the GPU. Convert through `.item()` instead.
"""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    collect_ignore = ["test_moba_triton.py"]
elif INTERPRETED:
    import triton.runtime.interpreter as interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_numpy2(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2
