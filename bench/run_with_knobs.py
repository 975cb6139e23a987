"""Run a script with module constants of the MoBA kernels set first (tuning experiments on the GPU):

    python3 bench/run_with_knobs.py backward.MAX_DKDV_SPLITS=1 -- scripts/bench_train.py --config ...

Each NAME=VALUE sets `moba_train.kernels.<module>.<NAME>` to the Python literal VALUE before the script runs
in this process (as `bench_kernels.py --variants` does for its variants)."""

import ast
import importlib
import runpy
import sys

if __name__ == "__main__":
    split = sys.argv.index("--")
    for knob in sys.argv[1:split]:
        name, value = knob.split("=", 1)
        module, attr = name.rsplit(".", 1)
        target = importlib.import_module(f"moba_train.kernels.{module}")
        if not hasattr(target, attr):
            sys.exit(f"moba_train.kernels.{module} has no {attr}; check the knob's name")
        setattr(target, attr, ast.literal_eval(value))
        print(f"knob: moba_train.kernels.{module}.{attr} = {value}", flush=True)
    sys.argv = sys.argv[split + 1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
