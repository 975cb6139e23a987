"""Plots of training runs from their own files, no W&B needed (scripts/plot_run.py is the entry point).

`plot_runs(run_dirs, out_dir)` reads each run's `metrics.jsonl` (moba_train.metrics) and overlays the
runs, labelled by directory name, e.g. MoBA against full attention:

    loss.png        train/loss (thin: every step; thick: moving average) and val/loss (markers) by step
    validation.png  the newest validation's loss by position bucket (val/loss_by_position/*), per run
    throughput.png  perf/tokens_per_s and perf/mfu by step (TFLOP/s per GPU where there is no MFU: CPU runs)
    routing.png     the moba/ layer means by step (gate recall, previous-block share, mean distance,
                    first-block share, head overlap) and the newest diagnostic's block popularity and
                    distance histogram (summed over layers), and the first run's newest selection
                    heatmap (diagnostics/heatmap_step_*.npz, averaged over layers)
A figure whose metrics no run has is not drawn. Files are written to a temporary sibling and renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moba_train.config import ConfigError
from moba_train.metrics import read_jsonl
from moba_train.staging import write_file

ROUTING = (
    ("moba/gate_recall", "gate recall (dense attention mass kept)"),
    ("moba/previous_block_share", "share picking the previous block"),
    ("moba/distance_mean", "mean distance of picked blocks (blocks)"),
    ("moba/first_block_share", "share of picks on the first block"),
    ("moba/head_overlap", "overlap between heads of a KV group"),
)


def load_runs(run_dirs: list[Path]) -> dict[str, list[dict]]:
    """{label: metrics.jsonl records}, labels the directory names (primed when repeated); ConfigError when a
    directory has no metrics.jsonl."""
    runs = {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"'{run_dir}' has no metrics.jsonl; pass the output_dir of a training run")
        label = run_dir.resolve().name
        while label in runs:
            label += "'"
        runs[label] = read_jsonl(path)
    return runs


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding a number under `key`."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _moving_average(values: np.ndarray) -> np.ndarray:
    window = max(1, len(values) // 50)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), kernel, mode="valid")


def _figure(rows: int, cols: int, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def _save(fig, path: Path) -> Path:
    return write_file(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _loss(runs: dict[str, list[dict]], out_dir: Path) -> Path | None:
    fig, (ax,) = _figure(1, 1, "loss")
    drawn = False
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps, loss = _series(records, "train/loss")
        if len(steps):
            ax.plot(steps, loss, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, _moving_average(loss), color=color, label=f"{label} train")
            drawn = True
        steps, val = _series(records, "val/loss")
        if len(steps):
            ax.plot(steps, val, "o--", color=color, label=f"{label} validation")
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "loss.png")


def _validation(runs: dict[str, list[dict]], out_dir: Path) -> Path | None:
    fig, (ax,) = _figure(1, 1, "validation loss by position (newest validation)")
    drawn = False
    for label, records in runs.items():
        last = next((r for r in reversed(records) if any(k.startswith("val/loss_by_position/") for k in r)), None)
        if last is None:
            continue
        buckets = sorted(((int(k.rsplit("/", 1)[1].split("-")[0]), int(k.rsplit("-", 1)[1]), v) for k, v in last.items()
                          if k.startswith("val/loss_by_position/")))
        centers = [(first + end) / 2 for first, end, _ in buckets]
        ax.plot(centers, [v for _, _, v in buckets], "o-", label=f"{label} (step {last['step']})")
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("position in the sequence (bucket centre)")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "validation.png")


def _throughput(runs: dict[str, list[dict]], out_dir: Path) -> Path | None:
    fig, (tokens_ax, util_ax) = _figure(1, 2, "throughput")
    drawn = False
    for label, records in runs.items():
        steps, tokens = _series(records, "perf/tokens_per_s")
        if len(steps):
            tokens_ax.plot(steps, tokens, label=label)
            drawn = True
        steps, mfu = _series(records, "perf/mfu")
        if len(steps):
            util_ax.plot(steps, 100 * mfu, label=f"{label} MFU (%)")
        else:
            steps, tflops = _series(records, "perf/tflops_per_gpu")
            util_ax.plot(steps, tflops, label=f"{label} TFLOP/s per GPU")
    if not drawn:
        return None
    tokens_ax.set_xlabel("step")
    tokens_ax.set_ylabel("tokens/s (all GPUs)")
    tokens_ax.legend(fontsize=8)
    util_ax.set_xlabel("step")
    util_ax.set_ylabel("MFU (%) or model TFLOP/s per GPU")
    util_ax.legend(fontsize=8)
    return _save(fig, out_dir / "throughput.png")


def _layer_sum(record: dict, prefix: str) -> np.ndarray | None:
    """The per-block values of `prefix/layer_NN` histograms of one record, summed over layers."""
    hists = [np.asarray(v["values"]) for k, v in record.items() if k.startswith(prefix + "/layer_")]
    if not hists:
        return None
    width = max(len(h) for h in hists)
    return sum(np.pad(h, (0, width - len(h))) for h in hists)


def _newest_heatmap(run_dirs: list[Path]) -> tuple[str, int, np.ndarray] | None:
    """(run label, step, heatmap averaged over layers) of the newest diagnostics/heatmap_step_*.npz of the
    first run that has one."""
    for run_dir in map(Path, run_dirs):
        files = sorted((run_dir / "diagnostics").glob("heatmap_step_*.npz"))
        if files:
            with np.load(files[-1]) as arrays:
                mean = np.mean([arrays[name] for name in arrays.files], axis=0)
            return run_dir.resolve().name, int(files[-1].stem.rsplit("_", 1)[1]), mean
    return None


def _routing(runs: dict[str, list[dict]], out_dir: Path, run_dirs: list[Path]) -> Path | None:
    fig, axes = _figure(2, 4, "MoBA routing (means over MoBA layers)")
    drawn = False
    for label, records in runs.items():
        for ax, (key, title) in zip(axes, ROUTING):
            steps, values = _series(records, key)
            if len(steps):
                ax.plot(steps, values, "o-", markersize=3, label=label)
                drawn = True
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        last = next((r for r in reversed(records) if "moba/gate_recall" in r), None)
        if last is None:
            continue
        layers = sum(1 for k in last if k.startswith("moba/gate_recall/layer_"))
        popularity, distance = _layer_sum(last, "moba/popularity"), _layer_sum(last, "moba/distance")
        axes[5].plot(np.arange(len(popularity)), popularity / layers, "o-", label=f"{label} (step {last['step']})")
        axes[6].plot(np.arange(len(distance)), distance / max(distance.sum(), 1), "o-",
                     label=f"{label} (step {last['step']})")
    if not drawn:
        return None
    axes[5].set_title("picks per query and head, by key block (newest)", fontsize=9)
    axes[5].set_xlabel("key block")
    axes[6].set_title("share of picks by distance (newest)", fontsize=9)
    axes[6].set_xlabel("query block - picked block")
    heat = _newest_heatmap(run_dirs)
    if heat is None:
        axes[7].axis("off")
    else:
        label, step, mean = heat
        image = axes[7].imshow(mean, vmin=0, vmax=1, cmap="viridis")
        axes[7].set_title(f"{label}: selection heatmap, step {step} (layer mean)", fontsize=9)
        axes[7].set_xlabel("key block")
        axes[7].set_ylabel("query block")
        fig.colorbar(image, ax=axes[7], shrink=0.8)
    for ax in axes[:7]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out_dir / "routing.png")


def plot_runs(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Draw the figures (see the module docstring) of the runs in `run_dirs` into `out_dir`; returns the files."""
    runs = load_runs(run_dirs)
    for run_dir, records in zip(run_dirs, runs.values()):
        if not any("train/loss" in r for r in records):
            raise ConfigError(f"'{run_dir}' has logged no training step yet; plot it once it has")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [draw(runs, out_dir) for draw in (_loss, _validation, _throughput)]
    drawn.append(_routing(runs, out_dir, list(run_dirs)))
    return [path for path in drawn if path is not None]
