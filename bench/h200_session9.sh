#!/usr/bin/env bash
# The GPU runs of session 9, one H200, from the repository root of a device call:
#   bash bench/h200_session9.sh speed-short # GPU tests of the fusions, the optimizer and the model; the chunked
#                                            # linear + cross-entropy timed beside Liger's (kernel and 32K step)
#   bash bench/h200_session9.sh study-full  # the quality study's arm 1 and what starts from it (arms 4 and 5)
#   bash bench/h200_session9.sh study-moba  # arms 2 and 3
#   bash bench/h200_session9.sh study-recall  # arm 1, then arm 5 with 0.75 of its steps (arm 4 was measured at 2cfcafa)
# Wheels (.whl: megatron-core, pydantic, datasets, liger-kernel) and, for the study, data/site_corpus are carried.
# TOKENS (tokens per pretraining arm) must be the same in both study calls.
source bench/gpu_env.sh
TOKENS=${TOKENS:-34078720}   # 520 steps of 8 x 8,192 tokens
study() {  # $1: arms, $2: budget in minutes, then more flags of run_study.py
  mkdir -p runs/study && ln -sfn "$PWD/data/site_corpus" runs/study/corpus
  python3 scripts/run_study.py --work-dir runs/study --results-dir "$OUT/quality" --budget-minutes "$2" \
    --workers 14 --tokens-per-arm "$TOKENS" --arms "$1" "${@:3}" > "$OUT/quality-console.log" 2>&1
  grep -v -i warn "$OUT/quality-console.log" | grep "\[study\]\|Error\|error" | tail -30
}
case "${1:-}" in
speed-short)  # what 300 s of device time allow: the GPU tests, the kernels' timing, two 32K arms
  python3 -m pytest -q -p no:cacheprovider tests/test_fusions.py tests/test_optimizer.py tests/test_model.py \
    > "$OUT/gpu-tests.log" 2>&1; grep -m3 "Error\|error" "$OUT/gpu-tests.log"; tail -2 "$OUT/gpu-tests.log"
  python3 scripts/bench_fusions.py --config $RECIPE --out "$OUT/fusions.json" 2>&1 | grep -v -i warn | tail -16
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 3 --profile \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --arm "moba512_fused_linear:attention.block_size=512,attention.topk=3,model.fusions.cross_entropy=fused_linear" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -5
  ;;
study-full) study full,cpt,recall_full,recall_moba,recall_hybrid 9.3 --recall-fraction 0.5 ;;
study-moba) study moba,hybrid 9.3 ;;
study-recall) study full,recall_full,recall_moba,recall_hybrid 9.0 --recall-fraction 0.75 ;;
*) echo "usage: bash bench/h200_session9.sh speed-short|study-full|study-moba|study-recall" >&2; exit 2 ;;
esac
