#!/usr/bin/env bash
# Session 37's prepared call, from the repository root of a device call; .whl and data/site_corpus.tar.xz carried:
#   SEED=<n> GIT_COMMIT=<sha> bash bench/h200_session37.sh arm5probed   # the shared start, arm 1, then arm 5 (the
#                                                                       # recall task, loss on the answers only) from
#                                                                       # arm 1's final weights with full attention,
#                                                                       # the last-2 hybrid and the probed hybrid
#                                                                       # (about 8 min on an H100)
# The probed hybrid meets the hybrid's pretraining floors where the last-2 hybrid misses them (docs/quality.md,
# sessions 34-37), but arm 5 is why the report keeps the last layers full: sparse-loss fine-tuning. Does the probed
# layout keep that? recall_hybrid_probed is `attention.full_layers_at=probe` as a user runs it: the trainer probes
# the model it starts from (arm 1's final weights) and keeps its 2 full layers where that model copies. Its target,
# recall_hybrid_probed_vs_full, is the hybrid's (within 5 points of full attention); the last-2 hybrid of the same
# run is the comparison the pool already holds three runs of.
case "${1:-}" in
arm5probed) ;;
*) echo "usage: SEED=<n> GIT_COMMIT=<sha> bash bench/h200_session37.sh arm5probed" >&2; exit 2 ;;
esac
: "${SEED:?set SEED=<n>}"
source bench/gpu_env.sh
source bench/study_call.sh
WORK_DIR=runs/study-seed$SEED-arm5probed
study full,recall_full,recall_hybrid,recall_hybrid_probed 9.5 "run.seed=$SEED"
grep "induction probe\|warning: only" "$OUT/quality-console.log"
python3 - "$OUT/quality/study.json" <<'PY'
import json, sys
state = json.load(open(sys.argv[1]))
for arm in ("recall_full", "recall_hybrid", "recall_hybrid_probed"):
    train, ev = state["arms"].get(arm, {}).get("train", {}), state["arms"].get(arm, {}).get("eval", {})
    print(arm, "layers", train.get("layer_kinds"), "recall", (ev.get("recall") or {}).get("fact_accuracy"))
print({k: v for k, v in state.get("targets", {}).items() if k.startswith("recall_")})
PY
