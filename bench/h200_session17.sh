#!/usr/bin/env bash
# Session 17's calls, one H200, from the repository root of a device call; .whl carried (and data/site_corpus.tar.xz
# for the study modes):
#   GIT_COMMIT=<sha> bash bench/h200_session17.sh full3   # the shared start and the hybrid arm only, with the last
#                                                        # 3 layers full (attention.full_layers=3), at the two seeds
#                                                        # whose 2-full-layer hybrid learned no retrieval (7890 and
#                                                        # 1357; about 4 min each): does one more full layer make the
#                                                        # hybrid learn retrieval there? Arm 1 of those seeds is in
#                                                        # bench/results/quality/h200-3f48023-seed7890 and
#                                                        # h200-daeb3a0-seed1357.
#   SEED=<n> GIT_COMMIT=<sha> bash bench/h200_session17.sh pair3   # run in session 18 (seeds 2468, 3579, 4680): the shared start, arm 1
#                                                        # and the hybrid with 3 full layers at one new seed (about
#                                                        # 7 min), so that recipe gets paired runs of its own;
#                                                        # scripts/pool_study.py pools them apart from the 2-layer runs
#   GIT_COMMIT=<sha> bash bench/h200_session17.sh tma       # run in session 18 (bench/NOTES.md): the compiled packed-dK/dV tests
#                                                        # (TMA included), then at r32k-b512 the packed rows by TMA
#                                                        # (backward.DKDV_TMA) and, in a second process (a variant
#                                                        # that fails to compile must not lose the first's numbers),
#                                                        # Triton's warp specialisation over them, also without the
#                                                        # dQ partials (about 5 min)
#   GIT_COMMIT=<sha> bash bench/h200_session17.sh train128k  # run in session 18: the 128K recipe since the
#                                                        # packed dK/dV (d07b199): full attention, the recipe (block
#                                                        # 1024, top-3, last 2 full) and all-MoBA (about 3 min)
case "${1:-}" in
full3|pair3|tma|train128k) ;;
*) echo "usage: bash bench/h200_session17.sh full3|pair3|tma|train128k" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
if [ "$1" = tma ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py -k "packed_dkdv" \
    > "$OUT/gpu-tests.log" 2>&1
  tail -3 "$OUT/gpu-tests.log"
  timeout 200 python3 scripts/bench_kernels.py --variants --out "$OUT/tma" --commit "$GIT_COMMIT" \
    --variant-shapes r32k-b512 --variant-names d64_base,d64_packed_tma,d64_probe_no_dq,d64_probe_no_dq_tma 2>&1 \
    | grep -v -i warn | grep -v "rel_err" | grep -v "^ " | tail -12
  timeout 200 python3 scripts/bench_kernels.py --variants --out "$OUT/ws" --commit "$GIT_COMMIT" \
    --variant-shapes r32k-b512 --variant-names d64_packed_ws,d64_packed_tma_ws,d64_probe_no_dq_tma_ws 2>&1 \
    | grep -v -i warn | grep -v "rel_err" | grep -v "^ " | tail -12
  exit
fi
if [ "$1" = train128k ]; then
  timeout 500 python3 scripts/bench_train.py --config configs/llama1b_moba_128k.yaml data.kind=synthetic \
    logging.progress_bar=off train.global_batch_size=1 --warmup 1 --steps 2 --profile --arm full:attention.mode=full \
    --arm moba1024t3: --arm moba1024t3_all:attention.full_layers=0 \
    --out "$OUT/train-h200-${GIT_COMMIT:0:7}-128k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -12
  exit
fi
source bench/study_call.sh
if [ "$1" = pair3 ]; then
  SEED=${SEED:?set SEED=<a seed not run before>}
  WORK_DIR=runs/study-seed$SEED-full3
  study full,hybrid 9.2 --track-passkey 16 "run.seed=$SEED" attention.full_layers=3
  exit
fi
ROOT_OUT=$OUT
for SEED in ${SEEDS:-1357 7890}; do
  OUT=$ROOT_OUT/seed$SEED; mkdir -p "$OUT"
  WORK_DIR=runs/study-seed$SEED-full3
  echo "seed $SEED"
  study hybrid 4.8 --track-passkey 16 "run.seed=$SEED" attention.full_layers=3
done
# The device tool returns at most 8 files per call and both seeds write 7 (session 17 lost seed 7890's study.json
# that way): one archive of both instead.
tar -czf "$ROOT_OUT/full3.tar.gz" -C "$ROOT_OUT" $(cd "$ROOT_OUT" && ls -d seed*) && rm -rf "$ROOT_OUT"/seed*
