#!/usr/bin/env bash
# The GPU runs of session 11 (docs/quality.md, bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session10.sh last   # first: 10b14c9's compact split partials on the GPU (kept from session 10)
#   bash bench/h200_session11.sh pilot  # arms 1-3 with half the batch (twice the steps, the same tokens), scored
#                                       # on copying too: does the 126M model learn to copy at 8K, and does MoBA?
# Carried: .whl (megatron-core, pydantic, datasets, liger-kernel) and data/site_corpus.tar.xz (the study corpus,
# tar -cJf of data/site_corpus: the corpus itself, 54 MiB, no longer fits the 64 MiB a call carries beside the
# tracked files and the wheels).
tar -xJf data/site_corpus.tar.xz -C data || exit 1
source bench/gpu_env.sh
TOKENS=${TOKENS:-34078720}   # 1,040 steps of 4 x 8,192 tokens: session 10's study had 520 of 8 x 8,192
case "${1:-}" in
pilot)
  mkdir -p runs/study && ln -sfn "$PWD/data/site_corpus" runs/study/corpus
  python3 scripts/run_study.py --work-dir runs/study --results-dir "$OUT/quality" --budget-minutes 8.2 \
    --workers 14 --tokens-per-arm "$TOKENS" --arms full,moba,hybrid --copy-documents 64 \
    train.global_batch_size=4 > "$OUT/quality-console.log" 2>&1
  grep -v -i warn "$OUT/quality-console.log" | grep "\[study\]\|Error\|error" | tail -30
  ;;
*) echo "usage: bash bench/h200_session11.sh pilot" >&2; exit 2 ;;
esac
