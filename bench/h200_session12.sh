#!/usr/bin/env bash
# The GPU runs of session 12 (docs/quality.md), one H200, from the repository root of a device call:
#   bash bench/h200_session12.sh study-a   # calibration, the shared start on short sequences, arms 1-3
#   bash bench/h200_session12.sh study-b   # arm 4 and the three arm-5 runs, in a second call while the machine
#                                          # still holds runs/study (otherwise it retrains the start and arm 1 first)
# Ran at 8668204 (bench/results/quality/h200-8668204-short/: 567 s and 302 s). Since 5892d9b the study recipes
# draw recall ids from the tokenizer's first 771 (data.synthetic.id_range). Ran again at f617509 (session 13,
# bench/results/quality/h200-f617509-a/ and -b/): study-b found no machine held and retrained the start and arms 1-2,
# so its budget ended after arm 5's full-attention run. bench/h200_session13.sh's calls stand alone.
# Carried: .whl (megatron-core, pydantic, datasets, liger-kernel) and data/site_corpus.tar.xz, the study corpus
# packed here with `tar -cJf data/site_corpus.tar.xz -C data site_corpus` (14 MB, 30 s).
# Set GIT_COMMIT=<sha> in the call: the copied tree's .git may be stale.
source bench/gpu_env.sh
source bench/study_call.sh
case "${1:-}" in
study-a) study full,moba,hybrid 9.2 ;;
study-b) study full,moba,cpt,recall_full,recall_moba,recall_hybrid 9.2 ;;  # moba: done in study-a; its top-k 6 evaluation runs here
*) echo "usage: bash bench/h200_session12.sh study-a|study-b" >&2; exit 2 ;;
esac
