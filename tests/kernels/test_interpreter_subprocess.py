"""The kernel tests in a fresh process with TRITON_INTERPRET=1 (used when triton was imported earlier)."""

import os
import subprocess
import sys
from pathlib import Path


def test_kernel_tests_pass_under_the_interpreter_in_a_fresh_process():
    here = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_moba_triton.py")],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=here.parents[1],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
