"""Run the kernel tests on CPU under the Triton interpreter.

TRITON_INTERPRET is read when a function is decorated with @triton.jit, including triton's own
standard library, so it must be set before triton is first imported in the test process.

Triton 3.6's interpreter holds scalars as 1-element numpy arrays and converts them with
`int(array)`, which numpy 2 rejects, so `range(0, n)` with a runtime `n` (e.g. loaded from memory)
fails under the interpreter although it compiles on the GPU. Convert through `.item()` instead.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
    del sys.modules[_name]  # decorated without the interpreter by an earlier import

import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

if not isinstance(tl.standard.sum, interpreter.InterpretedFunction):
    raise RuntimeError(
        "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
        "set TRITON_INTERPRET=1 in the environment (or in tests/conftest.py) to run the kernel tests on CPU."
    )

_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor_numpy2(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2
