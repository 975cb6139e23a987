#!/usr/bin/env bash
# Session 17's study call, one H200, from the repository root of a device call; .whl and data/site_corpus.tar.xz
# carried:
#   GIT_COMMIT=<sha> bash bench/h200_session17.sh full3   # the shared start and the hybrid arm only, with the last
#                                                        # 3 layers full (attention.full_layers=3), at the two seeds
#                                                        # whose 2-full-layer hybrid learned no retrieval (7890 and
#                                                        # 1357; about 4 min each): does one more full layer make the
#                                                        # hybrid learn retrieval there? Arm 1 of those seeds is in
#                                                        # bench/results/quality/h200-3f48023-seed7890 and
#                                                        # h200-daeb3a0-seed1357.
case "${1:-}" in
full3) ;;
*) echo "usage: bash bench/h200_session17.sh full3" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
source bench/study_call.sh
ROOT_OUT=$OUT
for SEED in ${SEEDS:-1357 7890}; do
  OUT=$ROOT_OUT/seed$SEED; mkdir -p "$OUT"
  WORK_DIR=runs/study-seed$SEED-full3
  echo "seed $SEED"
  study hybrid 4.8 --track-passkey 16 "run.seed=$SEED" attention.full_layers=3
done
