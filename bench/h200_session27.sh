#!/usr/bin/env bash
# Session 27's call, from the repository root of a device call; carry .whl, data/corpus (`make data`) and .baseline
# (`mkdir -p .baseline && git show <parent>:moba_train/attention/varlen.py > .baseline/varlen.py`: the version that
# repeated K and V to the query heads):
#   GIT_COMMIT=<sha> bash bench/h200_session27.sh varlen   # any GPU (~4 min): full attention on packed documents
#     with FA2's GQA (moba_train.attention.varlen.causal_varlen_attn):
#     1. tests/attention/test_varlen.py (FA2 runs on CUDA only);
#     2. scripts/bench_memory.py at the 32K recipe: what one layer keeps, packed full attention against session 26's
#        82,056 B/token (memory-h200-99f2efd-32k.json);
#     3. the new tests with .baseline/varlen.py in place (the memory test must fail there);
#     4. the 32K step with attention per document (data.reset_attention_mask), MoBA and full attention, then full
#        attention again in a second process with .baseline/varlen.py in place (the K/V repeats), the same batches
case "${1:-}" in
varlen) ;;
*) echo "usage: bash bench/h200_session27.sh varlen" >&2; exit 2 ;;
esac
: "${GIT_COMMIT:?pass GIT_COMMIT=<sha>}"
[ -f data/corpus/python.idx ] || { echo "data/corpus is missing: run make data here and carry data/corpus" >&2; exit 1; }
[ -f .baseline/varlen.py ] || { echo ".baseline/varlen.py is missing: see this script's header" >&2; exit 1; }
source bench/gpu_env.sh  # also GPU, TAG and S
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/attention/test_varlen.py > "$OUT/gpu-tests-$TAG-$S-varlen.log" 2>&1
tail -3 "$OUT/gpu-tests-$TAG-$S-varlen.log"
timeout 150 python3 scripts/bench_memory.py --config configs/llama1b_moba_32k_b512.yaml data.kind=synthetic \
  --out "$OUT/memory-$TAG-$S-32k.json" 2>&1 | grep -v -i warn | grep "B/token\|rror"
PACKED="--config configs/llama1b_moba_32k_b512.yaml logging.progress_bar=off train.global_batch_size=2
  run.output_dir=/tmp/runs/b512 data.reset_attention_mask=true data.reset_position_ids=true --warmup 2 --steps 5
  --profile"
timeout 150 python3 scripts/bench_train.py $PACKED --arm packed: --arm packed_full:attention.mode=full \
  --out "$OUT/train-$TAG-$S-32k-packed-gqa.json" 2>&1 | grep -v -i warn | grep "tokens/s\|breakdown\|rror"
cp moba_train/attention/varlen.py /tmp/varlen_new.py && cp .baseline/varlen.py moba_train/attention/varlen.py
echo "the new tests on the version before (the memory test should fail):"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/attention/test_varlen.py -k "full_attention" \
  > "$OUT/gpu-tests-$TAG-$S-varlen-before.log" 2>&1
tail -3 "$OUT/gpu-tests-$TAG-$S-varlen-before.log"
timeout 150 python3 scripts/bench_train.py $PACKED --arm packed_full_repeated_kv:attention.mode=full \
  --out "$OUT/train-$TAG-$S-32k-packed-repeated-kv.json" 2>&1 | grep -v -i warn | grep "tokens/s\|breakdown\|rror"
cp /tmp/varlen_new.py moba_train/attention/varlen.py
