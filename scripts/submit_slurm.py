"""Submit a training run as a SLURM job that requeues itself at its time limit or on preemption.

    python scripts/submit_slurm.py --config configs/llama8b_moba.yaml [section.key=value ...] \
        --nodes 8 --gpus-per-node 8 [--partition P] [--time HH:MM:SS] [--account A] [--qos Q] \
        [--profile configs/slurm/example_profile.yaml] [--dry-run]

Prints the job id, the script and the log path (`<output_dir>/slurm/`); --dry-run prints the script.
A CPU cluster: --gpus-per-node 0 --procs-per-node N. See moba_train/slurm.py and the README's SLURM section.
"""

import sys
from pathlib import Path

from moba_train.cli import run_entry
from moba_train.slurm import submit_main

if __name__ == "__main__":
    run_entry(lambda: submit_main(sys.argv[1:], pretrain=Path(__file__).resolve().with_name("pretrain.py")))
