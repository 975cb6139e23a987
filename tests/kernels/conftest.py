"""Run the kernel tests on CPU under the Triton interpreter.

TRITON_INTERPRET is read when a function is decorated with @triton.jit, including triton's own
standard library, so it must be set before triton is first imported. In a whole-suite run other
tests import triton first (Megatron-Core does on import); the kernel tests then run in a fresh
process (test_interpreter_subprocess.py) instead of in this one.

Triton 3.6's interpreter holds scalars as 1-element numpy arrays and converts them with
`int(array)`, which numpy 2 rejects, so `range(0, n)` with a runtime `n` (e.g. loaded from memory)
fails under the interpreter although it compiles on the GPU. Convert through `.item()` instead.
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["test_moba_triton.py"]
else:
    collect_ignore = ["test_interpreter_subprocess.py"]
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]  # decorated without the interpreter by an earlier import

    import triton.runtime.interpreter as interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_numpy2(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2
