# Sourced by bench/h200_session*.sh at the repository root of a device call: the carried wheels (.whl:
# megatron-core, pydantic, datasets, liger-kernel) installed into /tmp/site, the package on PYTHONPATH, $OUT,
# and the 1.1B recipe's common training overrides.
set -u
# ../shared/gpu_wheels.sh does not fetch Liger-Kernel: without it `model.fusions: auto` falls back to Megatron's
# SwiGLU and cross-entropy, and the numbers are not the recipe's (session 8's first call).
ls .whl/liger_kernel-*.whl >/dev/null 2>&1 || echo "warning: no liger-kernel wheel in .whl; run" \
  "pip download liger-kernel --no-deps -d .whl here first" >&2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GIT_COMMIT=${GIT_COMMIT:-unknown}
# Pass the commit as a literal sha: the device copy's .git can be older than the tree it carries, and
# `GIT_COMMIT=$(git rev-parse HEAD)` in a device command named the previous commit (session 14).
[ "$GIT_COMMIT" = unknown ] && echo "GIT_COMMIT is not set: results will name commit 'unknown'; pass" \
  "GIT_COMMIT=<sha> in the device command (sessions 12 and 13 corrected three results by hand)" >&2
ln -sfn ../kernels moba_train/kernels     # the GPU image's pip cannot install the checkout (see bench/NOTES.md)
# tests/conftest.py takes the checkout's root off sys.path (its kernels/ would shadow the hub package of that name), so
# pytest finds the package through /tmp/site (session 16's first call: the compiled tests failed to import it).
ln -sfn "$PWD/moba_train" /tmp/site/moba_train
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RECIPE=configs/llama1b_moba_32k.yaml
COMMON="data.kind=synthetic logging.progress_bar=off train.global_batch_size=2"
# The device, and the parts of bench/results names: TAG (h200 or h100) and S (the short commit)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) TAG=h200 ;; *) TAG=h100 ;; esac
S=${GIT_COMMIT:0:7}
echo "device: $GPU"
