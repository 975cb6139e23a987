#!/usr/bin/env bash
# Session 35's prepared call, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session35.sh probe   # about 2 min
# The trainer's probe (attention.full_layers_at=probe) on a GPU, in bf16, against scripts/probe_layers.py on the
# same Hugging Face directory: a random Llama of the tiny recipe's shape (large weights, so that heads differ), two
# training steps started from it with the probe, then the script's probe with the training length. Writes
# $OUT/probe-check.json (both probes' scores, the largest difference of a head's score, whether the layers agree)
# and exits non-zero where they disagree. Tested on CPU with PROBE_DEVICE=cpu (bench/NOTES.md, session 35).
case "${1:-}" in
probe) ;;
*) echo "usage: GIT_COMMIT=<sha> bash bench/h200_session35.sh probe" >&2; exit 2 ;;
esac
if [ "${PROBE_DEVICE:-cuda}" = cuda ]; then
  source bench/gpu_env.sh
else
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
fi
WORK=runs/probe-check
rm -rf "$WORK" && mkdir -p "$WORK"
# Only torch and transformers: the checkout's kernels/ must not shadow the hub package transformers may import.
env PYTHONPATH= python3 -P - "$WORK/hf" <<'EOF' || exit 1
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
# configs/tiny_moba.yaml's model: 3 layers, 128 wide, 4 query / 2 KV heads, vocabulary 512
config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.3,
                     rms_norm_eps=1e-5, tie_word_embeddings=False)
torch.manual_seed(35)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
EOF
SETTINGS="train.seq_length=512"
python3 scripts/pretrain.py --config configs/tiny_moba.yaml run.output_dir=$WORK/run run.device=${PROBE_DEVICE:-cuda} \
  model.init_from_hf=$WORK/hf attention.full_layers_at=probe data.kind=synthetic train.steps=2 train.warmup_steps=1 \
  train.micro_batch_size=1 train.global_batch_size=1 logging.progress_bar=off $SETTINGS \
  > "$OUT/probe-train.log" 2>&1 || { tail -20 "$OUT/probe-train.log"; exit 1; }
grep "induction probe" "$OUT/probe-train.log"
python3 scripts/probe_layers.py $WORK/hf --full-layers 1 --batch-size 1 --json "$OUT/probe-script.json" \
  run.device=${PROBE_DEVICE:-cuda} $SETTINGS > "$OUT/probe-script.log" 2>&1 || { tail -20 "$OUT/probe-script.log"; exit 1; }
cp "$WORK/run/probe.json" "$OUT/probe-trainer.json"
python3 -P - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
trainer, script = (json.load(open(f"{out}/probe-{name}.json")) for name in ("trainer", "script"))
diff = max(abs(a - b) for name in script["layers"]
           for a, b in zip(trainer["layers"][name]["heads"], script["layers"][name]["heads"]))
record = {"commit": __import__("os").environ.get("GIT_COMMIT", "unknown"), "max_head_difference": diff,
          "same_layers": trainer["layer_kinds"] == script["layer_kinds"], "trainer": trainer, "script": script}
json.dump(record, open(f"{out}/probe-check.json", "w"), indent=2)
best = lambda probe: [round(r["max"], 4) for r in probe["layers"].values()]
print("trainer", best(trainer), trainer["layer_kinds"])
print("script ", best(script), script["layer_kinds"])
print(f"largest difference of a head's score {diff:.2e}; same layers: {record['same_layers']}")
sys.exit(0 if record["same_layers"] and diff < 2e-3 else 1)
EOF
