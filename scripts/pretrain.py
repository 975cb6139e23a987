"""Pretrain (or continue pretraining) a Llama model with MoBA attention.

    torchrun --standalone --nproc_per_node=2 scripts/pretrain.py --config configs/tiny_moba.yaml [section.key=value ...]
    python scripts/pretrain.py --config configs/llama8b_moba.yaml --dry-run [--world-size 32]

Relaunching the same command resumes from the newest complete checkpoint. --dry-run prints the parallel
layout and the memory per GPU, building nothing (world size: --world-size, else torchrun's, else the
smallest the recipe's parallel sizes allow); on a machine without a GPU, a recipe with run.device auto is
described as on the GPU nodes (run.device=cpu describes a CPU run).
"""

import os
import sys

from moba_train.cli import parse_recipe, run_entry
from moba_train.signals import stop_with_the_launcher


def main(argv=None) -> None:
    cfg, args = parse_recipe(argv, description=__doc__.splitlines()[0], dry_run=True)
    if args.dry_run:
        from moba_train.preflight import dry_run

        par = cfg.parallel
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or par.tensor * par.pipeline * par.context
        print(dry_run(cfg, world))
        return
    from moba_train.training import train  # after the recipe is valid: importing Megatron takes seconds

    train(cfg)


if __name__ == "__main__":
    stop_with_the_launcher()  # before torch and Megatron load (seconds): a launcher dying meanwhile still counts
    run_entry(lambda: main(sys.argv[1:]))
