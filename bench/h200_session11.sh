#!/usr/bin/env bash
# The GPU runs of session 11 (docs/quality.md, bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session10.sh last   # first: 10b14c9's compact split partials on the GPU (kept from session 10)
#   bash bench/h200_session11.sh pilot  # (ran at 62be6bd) arms 1-3 with half the batch (twice the steps, the same
#                                       # tokens), scored on copying too: does the 126M model copy at 8K?
#   bash bench/h200_session11.sh study-full  # the next study: arm 1, then arms 4 and 5 from it (text copies)
#   bash bench/h200_session11.sh study-moba  # then arms 2 and 3, in a second call (the machine keeps runs/study
#                                            # while it stays warm; otherwise rerun study-full's arm 1 first)
# Carried: .whl (megatron-core, pydantic, datasets, liger-kernel) and data/site_corpus.tar.xz, the study corpus
# packed here with `tar -cJf data/site_corpus.tar.xz -C data site_corpus` (14 MB, 30 s; the corpus itself, 54 MiB,
# no longer fits the 64 MiB a call carries beside the tracked files and the wheels).
tar -xJf data/site_corpus.tar.xz -C data || exit 1
source bench/gpu_env.sh
TOKENS=${TOKENS:-34078720}   # 1,040 steps of 4 x 8,192 tokens: session 10's study had 520 of 8 x 8,192
study() {  # $1: arms, $2: budget in minutes, then more flags of run_study.py
  mkdir -p runs/study && ln -sfn "$PWD/data/site_corpus" runs/study/corpus
  python3 scripts/run_study.py --work-dir runs/study --results-dir "$OUT/quality" --budget-minutes "$2" \
    --workers 14 --tokens-per-arm "$TOKENS" --arms "$1" --copy-documents 64 "${@:3}" > "$OUT/quality-console.log" 2>&1
  grep -v -i warn "$OUT/quality-console.log" | grep "\[study\]\|Error\|error" | tail -30
}
case "${1:-}" in
pilot) study full,moba,hybrid 8.2 train.global_batch_size=4 ;;  # the recipe's own batch since session 11
study-full) study full,cpt,recall_full,recall_moba,recall_hybrid 9.3 --recall-fraction 0.5 ;;
study-moba) study moba,hybrid 9.3 ;;
*) echo "usage: bash bench/h200_session11.sh pilot|study-full|study-moba" >&2; exit 2 ;;
esac
