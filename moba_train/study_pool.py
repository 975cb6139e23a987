"""The study's targets over repeated runs: one verdict from several study.json files.

One run of an arm pair is one sample of a noisy difference. Four runs of arm 1 with one seed spread over
1.4% in validation loss on the H200 (docs/quality.md, session 13), more than the hybrid's 0.5% floor, so a
single run cannot decide that floor. Here every run contributes its own paired gap (the arm against full
attention trained in the same run, from the same start), and the runs' gaps give a mean, a standard error
and a two-sided 95% Student-t interval:

    met        the whole interval is within the limit
    missed     the whole interval is beyond it
    undecided  the interval holds the limit, or there is only one run (no spread to judge it by)

Accuracy targets skip the runs where full attention itself scores under 10% (`study.INFORMATIVE_ACCURACY`,
marked `uninformative` in that run's targets). Arm 5 against pure MoBA has no limit (the issue asks for its
gap only): it is reported, without a verdict.

    python scripts/pool_study.py bench/results/quality/h200-8668204-short bench/results/quality/h200-f617509-a ...

A mean hides a recipe that sometimes fails outright (session 16: of six hybrid runs whose recall was
measured, one recalled 6% of the mixed recall task's facts, as pure MoBA does, where the others recalled
98-99%). So the pool also counts, per arm, the runs whose recall of the mixed task is below half of full
attention's in the same run (`retrieval_failures`), over the runs where full attention's recall is informative.

Where the loss gap lies: per arm, the paired gap of each position bucket of the long held-out documents
(`long_documents` in each arm's evaluation: the first 8K tokens of documents at least that long), pooled the same
way (`gaps_by_position`). A gap that grows with position is one of long-range context: before position block x
top-k, MoBA attends to every earlier key, as full attention does.

Whether more training would close it: per arm, the training-loss gap paired step by step (every arm trains on the
same batches in the same order as full attention), averaged over eighths of the steps and pooled the same way
(`training_gaps_pooled`). A gap that stays flat over the eighths is not one that more tokens make up.

Which runs are failing, before the end: where a run tracked passkeys in training (`--track-passkey`), the pool lists
per arm and run the key loss on those prompts minus full attention's at each logged step (`key_loss_gaps`). Over
the 20 committed hybrid runs that logged it, that gap at each eighth of the steps from the sixth on was 1.26 nats
or more in each of the 7 that learned no retrieval and 1.12 or less in each of the 13 that learned it; at the
fifth the two ranges overlap (docs/quality.md, session 33).

Whether the probe's placement helps: where a run trained both hybrids (the last 2 layers full, and the probed
hybrid's layers), `hybrid_probed_validation_loss_vs_hybrid` is their own paired gap, reported without a floor. It
needs no arm 1, so the cheaper calls that train only the two hybrids from one start count too.

Runs pool only if they share the plan (steps, tokens, lengths, the shared start), the recipe overrides other
than run.seed and, where both recorded them, the study recipes (`recipes` in study.json: a SHA-256 of each
configs/study file) and the corpus (its training and held-out token counts). The corpus is built from a
machine's installed packages, so a fresh machine builds another one, with another held-out split;
`mixed_corpora=True` (`--mixed-corpora`) pools such runs anyway, the corpus then one more source of spread, as
the seed is, and each run's corpus in the table.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from moba_train.config import ConfigError
from moba_train.study import RETRIEVAL_ARMS, _metric, learned_no_retrieval, retrieval_pairs, targets

LEVEL = 0.95
"""Two-sided coverage of the intervals."""

TRAINING_PARTS = 8
"""Spans of the training steps over which `training_gaps` averages the per-step loss gaps."""


def t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with df degrees of freedom, in closed form (Abramowitz and Stegun 26.7.3-4:
    theta = atan(t / sqrt(df)); a finite series in cos(theta) whose length grows with df)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: 2/pi (theta + sin theta (cos theta + 2/3 cos^3 theta + ... + cos^(df-2) theta))
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + sin * total)
    term = total = 1.0  # even: sin theta (1 + 1/2 cos^2 theta + 1*3/(2*4) cos^4 theta + ... + cos^(df-2) theta)
    for k in range(1, df // 2):
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return sin * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| < t) = level (e.g. 12.706 for 0.95 and df 1, 1.96 as df grows), by bisection."""
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def _samples(state: dict) -> dict[str, tuple[float, float | None, str]]:
    """One run's targets as (value, limit, unit): loss gaps in percent, accuracies in points below full
    attention; uninformative accuracy targets are left out."""
    out = {}
    for name, record in targets(state).items():
        if "relative_gap" in record:
            limit = None if record["limit"] is None else 100 * record["limit"]
            out[name] = (100 * record["relative_gap"], limit, "percent")
        elif "uninformative" not in record:
            out[name] = (record["points_below_full"], record["limit"], "points")
    return out


def retrieval_failures(runs: dict[str, dict]) -> dict[str, dict]:
    """Per arm: {runs: {name: (arm's recall, full's recall)}, failed: [names]}, over the runs where both were
    measured and full attention's recall is informative (`study.retrieval_pairs`); a run fails where the arm's
    is below half of full's (`study.learned_no_retrieval`)."""
    by_run = {name: retrieval_pairs(state) for name, state in runs.items()}
    out = {}
    for arm in RETRIEVAL_ARMS:
        pairs = {name: run[arm] for name, run in by_run.items() if arm in run}
        if pairs:
            out[arm] = {"runs": pairs, "failed": [name for name, (a, f) in pairs.items() if learned_no_retrieval(a, f)]}
    return out


def _interval(xs: list[float]) -> dict:
    """mean, and (with two or more values) sd, se and the two-sided Student-t interval at LEVEL."""
    record = {"n": len(xs), "mean": statistics.fmean(xs)}
    if len(xs) > 1:
        sd = statistics.stdev(xs)
        se = sd / math.sqrt(len(xs))
        half = t_quantile(LEVEL, len(xs) - 1) * se
        record.update(sd=sd, se=se, interval=[record["mean"] - half, record["mean"] + half])
    return record


def _pool_columns(by_run: dict[str, list[float | None]]) -> list[dict | None]:
    """Per column of the runs' equal-length lists: `_interval` of its values (None values left out), or None
    where no run has one."""
    return [_interval(values) if (values := [x for x in column if x is not None]) else None
            for column in zip(*by_run.values())]


def position_gaps(state: dict) -> dict[str, tuple[list[list[int]], list[float]]]:
    """One run's loss gaps by position: per arm of RETRIEVAL_ARMS evaluated on the long held-out documents, as full
    attention was, (the buckets' [start, end) positions, the arm's loss in each against full's, in percent)."""
    full = _metric(state, "full", "long_documents", "buckets")
    out = {}
    for arm in RETRIEVAL_ARMS:
        own = _metric(state, arm, "long_documents", "buckets")
        if not own or not full:
            continue
        edges = [[b["start"], b["end"]] for b in own]
        if edges != [[b["start"], b["end"]] for b in full]:
            raise ConfigError(f"the {arm} arm was evaluated on other position buckets than full attention in the "
                              "same run: evaluate both with one --bucket-size")
        out[arm] = (edges, [100 * (b["loss"] / f["loss"] - 1) for b, f in zip(own, full)])
    return out


def gaps_by_position(runs: dict[str, dict]) -> dict[str, dict]:
    """Per arm: {buckets, runs: {name: [gap per bucket]}, pooled: [mean, sd, interval of each bucket]}, over the
    runs whose arm and full attention were evaluated on the long held-out documents, and where runs measured it
    (session 20 on) the same for the arm's gate recall in percent (`gate_recall`: {runs, pooled}). ConfigError
    where two runs bucketed the positions differently."""
    out: dict[str, dict] = {}
    for name, state in runs.items():
        for arm, (edges, gaps) in position_gaps(state).items():
            entry = out.setdefault(arm, {"buckets": edges, "first": name, "runs": {}})
            if edges != entry["buckets"]:
                raise ConfigError(f"{name} bucketed the positions of its long documents otherwise than "
                                  f"{entry['first']} ({edges} against {entry['buckets']}): pool runs of one evaluation")
            entry["runs"][name] = gaps
            gate = _metric(state, arm, "gate_recall", "buckets")
            if gate and [[b["start"], b["end"]] for b in gate] == edges:
                entry.setdefault("gate_recall", {"runs": {}})["runs"][name] = [100 * b["gate_recall"] for b in gate]
    for entry in out.values():
        del entry["first"]
        for record in (entry, entry.get("gate_recall")):
            if record:
                record["pooled"] = _pool_columns(record["runs"])
    return out


def training_gaps(state: dict, parts: int = TRAINING_PARTS) -> dict[str, list[float | None]]:
    """One run's training-loss gaps over its steps: per arm of RETRIEVAL_ARMS with a loss curve, the mean of (arm's
    loss minus full attention's) over the steps both logged, in each of `parts` equal spans of full attention's
    steps (nats). Both arms see the same batches in the same order, so each step is a paired difference. None for
    a span where the arm did not train (arm 4's MoBA half starts at the middle)."""
    full = dict(_metric(state, "full", "loss_curve", key="train") or [])
    if not full:
        return {}
    last = max(full)
    out = {}
    for arm in RETRIEVAL_ARMS:
        own = dict(_metric(state, arm, "loss_curve", key="train") or [])
        if not own:
            continue
        spans: list[list[float]] = [[] for _ in range(parts)]
        for step in sorted(own.keys() & full.keys()):
            spans[min(parts - 1, (step - 1) * parts // last)].append(own[step] - full[step])
        out[arm] = [statistics.fmean(gaps) if gaps else None for gaps in spans]
    return out


def key_loss_gaps(state: dict) -> dict[str, list[list[float]]]:
    """One run's in-training retrieval check against full attention's: per arm of RETRIEVAL_ARMS that logged a
    `retrieval_curve` (`--track-passkey`: the key loss on held-out passkey prompts at each eighth of the steps),
    [step, the arm's key loss minus full attention's] at each step both logged, in nats."""
    full = {step: loss for step, loss, *_ in _metric(state, "full", "retrieval_curve", key="train") or []}
    out = {}
    for arm in RETRIEVAL_ARMS:
        own = _metric(state, arm, "retrieval_curve", key="train") or []
        gaps = [[step, loss - full[step]] for step, loss, *_ in own if step in full]
        if gaps:
            out[arm] = gaps
    return out


def training_gaps_pooled(runs: dict[str, dict], parts: int = TRAINING_PARTS) -> dict[str, dict]:
    """Per arm: {runs: {name: [gap per span]}, pooled: [mean, sd, interval per span, None where no run trained]}
    (`training_gaps` of each run). Does more training close an arm's gap? A gap that stays flat over the spans
    says that, at this scale, more tokens would not."""
    out: dict[str, dict] = {}
    for name, state in runs.items():
        for arm, gaps in training_gaps(state, parts).items():
            out.setdefault(arm, {"runs": {}})["runs"][name] = gaps
    for entry in out.values():
        entry["pooled"] = _pool_columns(entry["runs"])
    return out


def _recipe_overrides(state: dict) -> list[str]:
    """The study's recipe overrides of a run (scripts/run_study.py's positional ones), run.seed aside: a seed is
    one more sample of the same recipe; any other override (e.g. attention.full_layers=3) is another recipe."""
    overrides = (state.get("settings") or {}).get("overrides") or []
    return sorted(o for o in overrides if not o.replace(" ", "").startswith("run.seed="))


def corpus_tokens(state: dict) -> tuple[int, int] | None:
    """(training tokens, held-out tokens) of the corpus a run trained on; None where study.json has none."""
    splits = (state.get("corpus") or {}).get("splits") or {}
    if "train" not in splits or "valid" not in splits:
        return None
    return splits["train"]["tokens"], splits["valid"]["tokens"]


def pool(runs: dict[str, dict], mixed_corpora: bool = False) -> dict:
    """{run name: study.json state} -> per target: the runs' values, mean, sd, se, the 95% interval and the
    verdict. ConfigError if the runs do not share one plan and recipe, or (unless mixed_corpora) one corpus."""
    if not runs:
        raise ConfigError("no study runs to pool: give one or more results directories holding study.json")
    names = list(runs)
    first = runs[names[0]]
    for name in names[1:]:
        state = runs[name]
        if state.get("plan") != first.get("plan"):
            raise ConfigError(f"{name} ran another plan than {names[0]} ({state.get('plan')} against "
                              f"{first.get('plan')}): pool only runs of one plan")
        a, b = first.get("recipes"), state.get("recipes")
        if a and b and a != b:
            raise ConfigError(f"{name} trained other study recipes than {names[0]} (configs/study hashes "
                              "differ): pool only runs of one recipe")
        a, b = _recipe_overrides(first), _recipe_overrides(state)
        if a != b:
            raise ConfigError(f"{name} trained with the overrides {b or 'none'} and {names[0]} with {a or 'none'} "
                              "(run.seed aside): pool only runs of one recipe, which may differ in run.seed alone")
    corpora = {name: corpus_tokens(state) for name, state in runs.items()}
    known = {name: corpus for name, corpus in corpora.items() if corpus is not None}
    if len(set(known.values())) > 1 and not mixed_corpora:
        a, *others = known
        b = next(name for name in others if known[name] != known[a])
        raise ConfigError(f"{b} was trained on another corpus than {a} ({known[b][0]:,} training and "
                          f"{known[b][1]:,} held-out tokens against {known[a][0]:,} / {known[a][1]:,}): pool "
                          "only runs of one corpus, or pass --mixed-corpora to count the corpus as one more "
                          "source of spread")
    values: dict[str, dict] = {}
    for name in names:
        for target, (value, limit, unit) in _samples(runs[name]).items():
            if not math.isfinite(value):
                raise ConfigError(f"{name}: its {target} is not a finite number ({value}; a diverged arm?); leave "
                                  "that run out of the pool")
            entry = values.setdefault(target, {"unit": unit, "limit": limit, "runs": {}})
            entry["runs"][name] = value
    out = {"level": LEVEL, "runs": {name: {"commit": runs[name].get("commit"),
                                           "overrides": runs[name].get("settings", {}).get("overrides", []),
                                           "corpus": "-" if corpora[name] is None
                                           else f"{corpora[name][0]:,} / {corpora[name][1]:,}"}
                                    for name in names},
           "plan": first.get("plan"), "corpora": max(1, len(set(known.values()))), "targets": {},
           "retrieval_failures": retrieval_failures(runs), "by_position": gaps_by_position(runs),
           "by_training_span": training_gaps_pooled(runs), "key_loss_gaps": {}}
    for name, state in runs.items():
        for arm, gaps in key_loss_gaps(state).items():
            out["key_loss_gaps"].setdefault(arm, {})[name] = gaps
    for target, entry in sorted(values.items()):
        record = {**entry, **_interval(list(entry["runs"].values()))}
        record["verdict"] = _verdict(record)
        out["targets"][target] = record
    return out


def _verdict(record: dict) -> str:
    if record["limit"] is None:
        return "reported"
    if "interval" not in record:
        return "undecided"
    lo, hi = record["interval"]
    return "met" if hi <= record["limit"] else "missed" if lo > record["limit"] else "undecided"


def load_runs(dirs: list[str | Path]) -> dict[str, dict]:
    """{directory name: state} from each directory's study.json (or a study.json path itself)."""
    runs = {}
    for entry in dirs:
        path = Path(entry)
        path = path / "study.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{entry} holds no study.json: give the results directories of study runs")
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}): give the study.json a study run wrote") from err
        if not isinstance(state, dict) or "arms" not in state:
            raise ConfigError(f"{path} is not a study.json (no 'arms'): give the study.json a study run wrote")
        name = path.parent.name
        if name in runs:
            raise ConfigError(f"two runs are named {name}: give each run once")
        runs[name] = state
    return runs


def pooled_markdown(pooled: dict) -> str:
    corpora = pooled.get("corpora", 1)
    lines = [f"# The study's targets over {len(pooled['runs'])} runs"
             + (f" of {corpora} corpora" if corpora > 1 else "")
             + f" ({100 * pooled['level']:.0f}% Student-t intervals of the runs' paired gaps)", "",
             "| run | commit | overrides | corpus (training / held-out tokens) |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {run['commit']} | {' '.join(run['overrides']) or '-'} | {run.get('corpus', '-')} |"
              for name, run in pooled["runs"].items()]
    lines += ["", "| target | unit | runs | values | mean | sd | 95% interval | limit | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in pooled["targets"].items():
        values = ", ".join(f"{v:.2f}" for v in t["runs"].values())
        interval = "-" if "interval" not in t else f"{t['interval'][0]:.2f} to {t['interval'][1]:.2f}"
        sd = "-" if "sd" not in t else f"{t['sd']:.2f}"
        limit = "-" if t["limit"] is None else f"{t['limit']:.2f}"
        lines.append(f"| {name} | {t['unit']} | {t['n']} | {values} | {t['mean']:.2f} | {sd} | {interval} | "
                     f"{limit} | {t['verdict']} |")
    failures = pooled.get("retrieval_failures") or {}
    if failures:
        lines += ["", "Runs that learned no retrieval: the arm's recall of the mixed task's facts below half of full "
                  "attention's in the same run.", "",
                  "| arm | failed / runs | recall, arm / full (each run) | failed runs |", "| --- | --- | --- | --- |"]
        for arm, record in failures.items():
            each = ", ".join(f"{100 * a:.0f} / {100 * f:.0f}" for a, f in record["runs"].values())
            lines.append(f"| {arm} | {len(record['failed'])} / {len(record['runs'])} | {each} | "
                         f"{', '.join(record['failed']) or '-'} |")
    by_position = pooled.get("by_position") or {}
    if by_position:
        lines += ["", "Loss gap by position on the long held-out documents: percent above full attention in the same "
                  "run, mean (95% interval) over the runs.", ""]
        lines += _position_table(by_position, "+.2f")
    gated = {arm: {**entry["gate_recall"], "buckets": entry["buckets"]} for arm, entry in by_position.items()
             if entry.get("gate_recall")}
    if gated:
        lines += ["", "Gate recall by position on the same documents: the share (%) of dense attention's mass on the "
                  "keys MoBA attends, mean (95% interval) over the runs.", ""]
        lines += _position_table(gated, ".1f")
    spans = pooled.get("by_training_span") or {}
    if spans:
        lines += ["", f"Training-loss gap over the steps: the arm's loss minus full attention's at the same step (the "
                  f"same batches), averaged over each of {TRAINING_PARTS} equal spans of the steps, in nats; mean "
                  "(95% interval) over the runs.", ""]
        lines += _pooled_table(spans, "+.3f", f"steps (span of {TRAINING_PARTS})",
                               [str(i + 1) for i in range(TRAINING_PARTS)])
    key_gaps = pooled.get("key_loss_gaps") or {}
    if key_gaps:
        failed = {arm: set(record["failed"]) for arm, record in failures.items()}
        lines += ["", "Key loss on the passkeys tracked in training minus full attention's at the same step, in nats "
                  "(each run; `no retrieval`: the run's recall of the mixed task's facts is below half of full "
                  "attention's).", "", "| arm | run | gap at each logged step (step: nats) |", "| --- | --- | --- |"]
        for arm, by_run in key_gaps.items():
            for name, gaps in by_run.items():
                mark = " (no retrieval)" if name in failed.get(arm, ()) else ""
                each = ", ".join(f"{step}: {gap:+.2f}" for step, gap in gaps)
                lines.append(f"| {arm} | {name}{mark} | {each} |")
    return "\n".join(lines) + "\n"


def _position_table(columns: dict[str, dict], spec: str) -> list[str]:
    """A table with a column per arm ({buckets, runs, pooled}) and a row per position bucket: each arm's pooled mean
    (and interval) in the format `spec`."""
    edges = max((entry["buckets"] for entry in columns.values()), key=len)
    return _pooled_table(columns, spec, "positions", [f"{start}-{end}" for start, end in edges])


def _pooled_table(columns: dict[str, dict], spec: str, first: str, labels: list[str]) -> list[str]:
    """A table with a column per arm ({runs, pooled}) and a row per label: each arm's pooled mean (and interval)
    in the format `spec`, "-" where the arm has none."""
    heads = " | ".join(f"{arm} ({len(entry['runs'])} runs)" for arm, entry in columns.items())
    rows = [f"| {first} | {heads} |", "| --- |" + " --- |" * len(columns)]
    for i, label in enumerate(labels):
        cells = []
        for entry in columns.values():
            record = entry["pooled"][i] if i < len(entry["pooled"]) else None
            if record is None:
                cells.append("-")
            elif "interval" in record:
                lo, hi = record["interval"]
                cells.append(f"{record['mean']:{spec}} ({lo:{spec}} to {hi:{spec}})")
            else:
                cells.append(f"{record['mean']:{spec}}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def plot_gaps_by_position(pooled: dict, path: str | Path) -> Path:
    """One line per arm: the pooled loss gap of each position bucket (percent above full attention) with its 95%
    interval as a band, and each run's gaps as faint lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moba_train.evaluation import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, entry in pooled["by_position"].items():
        centers = [(start + end) / 2 / 1024 for start, end in entry["buckets"]]
        means = [record["mean"] for record in entry["pooled"]]
        (line,) = ax.plot(centers, means, marker="o", label=f"{arm} ({len(entry['runs'])} runs)")
        for gaps in entry["runs"].values():
            ax.plot(centers, gaps, color=line.get_color(), alpha=0.15, linewidth=1)
        if all("interval" in record for record in entry["pooled"]):
            ax.fill_between(centers, [r["interval"][0] for r in entry["pooled"]],
                            [r["interval"][1] for r in entry["pooled"]], color=line.get_color(), alpha=0.2)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("position in the document (K tokens, bucket centre)")
    ax.set_ylabel("loss above full attention (%)")
    ax.set_title("loss gap by position, long held-out documents")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
