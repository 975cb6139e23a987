"""Where a relaunched run continues, and what a new run starts from, decided before anything is built.

`find_resume_point` walks the complete checkpoints newest first, verifies each against its checksums
(moba_train.checksums), passes over damaged ones saying which and why, and checks the one it takes
against the recipe:
- the model's structure (STRUCTURE: the keys that shape or name its weights) must be the checkpoint's:
  a change is one line (a resumed run keeps its model; a new run may start from the weights);
- the optimizer's state layout (distributed or not, bf16 main parameters or not) must be the
  checkpoint's: a change is one line naming the settings to restore;
- anything else (attention mode, block size, top-k, full layers, learning rate and schedule, steps,
  data, batch, sequence length, seed, parallel sizes, ...) is what continued training changes: it is
  allowed and listed.
`check_init_from` checks the structure of `checkpoint.init_from` the same way. A checkpoint's
config.yaml is compared as written (raw YAML), so a recipe key renamed since it was written is listed
as a change instead of failing validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from megatron.core import dist_checkpointing

from moba_train import checksums
from moba_train.checkpointing import TrainState, complete_checkpoints, resolve_checkpoint
from moba_train.cli import SharedConfigError
from moba_train.config import Config, ConfigError

STRUCTURE = (
    "model.vocab_size", "model.make_vocab_size_divisible_by", "model.hidden_size", "model.num_layers",
    "model.num_attention_heads", "model.num_query_groups", "model.ffn_hidden_size", "model.kv_channels",
    "model.tie_embeddings", "model.transformer_impl",
)
"""Recipe keys that set the shapes or names of the model's weights (model.kv_channels unset means
hidden_size / num_attention_heads: it counts as changed only when the head dimension changes)."""
_UNSET = "unset"


@dataclass
class ResumePoint:
    path: Path
    state: TrainState


def _flat(recipe: dict) -> dict[str, Any]:
    """`section.key` -> value of a recipe dict."""
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(recipe, "")
    return flat


def saved_recipe(checkpoint: Path) -> dict[str, Any] | None:
    """`section.key` -> value of the config.yaml a checkpoint was saved with, as written (None without one)."""
    path = checkpoint / "config.yaml"
    return _flat(yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def _differences(ours: dict, theirs: dict, keys) -> list[tuple[str, Any, Any]]:
    return [(key, theirs.get(key, _UNSET), ours.get(key, _UNSET)) for key in keys
            if theirs.get(key, _UNSET) != ours.get(key, _UNSET)]


def _head_dim(recipe: dict) -> int | None:
    heads = recipe.get("model.num_attention_heads")
    return recipe.get("model.kv_channels") or (recipe.get("model.hidden_size") // heads if heads else None)


def _structure_differences(ours: dict, theirs: dict) -> list[tuple[str, Any, Any]]:
    return [d for d in _differences(ours, theirs, STRUCTURE)
            if d[0] != "model.kv_channels" or _head_dim(ours) != _head_dim(theirs)]


def _listed(differences) -> str:
    return ", ".join(f"{key} {old} -> {new}" for key, old, new in differences)


def _describe(layout: dict) -> str:
    return (f"{'bf16' if layout['bf16'] else 'fp32'} training with "
            f"{'the distributed' if layout['distributed_optimizer'] else 'a non-distributed'} optimizer")


def _check_resumable(cfg: Config, checkpoint: Path, layout: dict) -> list[tuple[str, Any, Any]]:
    """The allowed recipe changes since `checkpoint`; SharedConfigError for a structure or layout change."""
    ours, theirs = _flat(cfg.model_dump(mode="json")), saved_recipe(checkpoint)
    if theirs is None:
        return []
    changed = _structure_differences(ours, theirs)
    if changed:
        raise SharedConfigError(
            f"the recipe changes the model of the checkpoint it resumes, '{checkpoint}' ({_listed(changed)}); "
            f"a resumed run keeps its model: restore the value, or start a new run from these weights with "
            f"another run.output_dir and checkpoint.init_from={checkpoint}"
        )
    saved_layout = dist_checkpointing.load_common_state_dict(str(checkpoint)).get("optimizer_layout")
    if saved_layout is not None and saved_layout != layout:
        raise SharedConfigError(
            f"checkpoint '{checkpoint}' holds the optimizer state of {_describe(saved_layout)}, but this run is "
            f"{_describe(layout)}; set train.precision={'bf16' if saved_layout['bf16'] else 'fp32'} and "
            f"parallel.distributed_optimizer={str(saved_layout['distributed_optimizer']).lower()} to resume it"
        )
    return _differences(ours, theirs, sorted(set(ours) | set(theirs)))


def find_resume_point(cfg: Config, root: Path, layout: dict, is_main: bool) -> ResumePoint | None:
    """The newest intact complete checkpoint under `root` and its trainer state, None when there is none
    (SharedConfigError when there are some and every one is damaged, or the recipe cannot resume it).
    `layout` is this run's `checkpointing.optimizer_layout`. Rank 0 prints what it passed over and the
    recipe changes. Collective (the checksums are shared out over the ranks)."""
    found = complete_checkpoints(root)
    damaged = []
    for checkpoint in reversed(found):
        damage = checksums.find_damage(checkpoint)
        if damage is None:
            break
        damaged.append((checkpoint, damage))
        if is_main:
            print(f"passing over checkpoint {checkpoint}: it is damaged: {damage}", flush=True)
    else:
        if damaged:
            newest, damage = damaged[0]
            raise SharedConfigError(
                f"every checkpoint in '{root}' is damaged (the newest, {newest.name}: {damage}); move them "
                "elsewhere to start over, or set checkpoint.resume=false"
            )
        return None
    if is_main and not checksums.has_manifest(checkpoint):
        print(f"checkpoint {checkpoint} has no {checksums.MANIFEST} (written before checkpoints had checksums): "
              "loading it unverified", flush=True)
    changes = _check_resumable(cfg, checkpoint, layout)
    if is_main and changes:
        print(f"recipe changes since {checkpoint.name} (allowed when continuing): {_listed(changes)}", flush=True)
    state = TrainState(**dist_checkpointing.load_common_state_dict(str(checkpoint))["trainer"])
    return ResumePoint(checkpoint, state)


def check_init_from(cfg: Config) -> Path:
    """The checkpoint `checkpoint.init_from` names, when its model has the recipe's structure;
    SharedConfigError otherwise (one line naming the differing keys)."""
    try:
        checkpoint = resolve_checkpoint(cfg.checkpoint.init_from)
    except ConfigError as err:
        raise SharedConfigError(f"checkpoint.init_from: {err}") from None
    theirs = saved_recipe(checkpoint)
    changed = _structure_differences(_flat(cfg.model_dump(mode="json")), theirs) if theirs else []
    if changed:
        mismatches = " and ".join(f"{key} is {new!r}" for key, _, new in changed)
        fixes = " ".join(f"{key}={old!r}" for key, old, _ in changed)
        raise SharedConfigError(
            f"recipe {mismatches} but the checkpoint.init_from checkpoint '{checkpoint}' has "
            f"{' and '.join(repr(old) for _, old, _ in changed)}; set {fixes} to match it"
        )
    return checkpoint
