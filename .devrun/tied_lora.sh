#!/usr/bin/env bash
# One H200, about 5 minutes: the LoRA scripts on the tied `1b` preset (tie_word_embeddings, as Llama 3.2), now that
# every LoRA script sets ensure_weight_tying (hftrain/lora.py). FSDP2 with one process still wraps the model: it checks
# that the tied modules_to_save copy shards, trains and saves under FSDP2 (fsdp_lora.py, fsdp_qlora.py), and qlora.py.
# Expect each run "done:", the adapter holding one embed_tokens copy (lm_head tied to it) and the reload's accuracy equal.
# Writes $OUT/tied_lora.log.
source .device-kit/setup.sh
LOG=$OUT/tied_lora.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOG"
STEPS=(--model 1b --max_steps 20 --per_device_train_batch_size 8 --eval_strategy no --save_strategy no --report_to none)
run() {  # name, then the launch
  local name=$1; shift
  timeout 140 "$@" "${STEPS[@]}" --output_dir "/tmp/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$LOG"
  grep -E "defaults|trainable params|done:|rror|ensure_weight_tying" "$OUT/$name.log" | tail -5 | tee -a "$LOG"
  python3 - "/tmp/$name" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from safetensors import safe_open
out = sys.argv[1]
with safe_open(f"{out}/adapter_model.safetensors", "pt") as f:
    keys = [k for k in f.keys() if "embed_tokens" in k or "lm_head" in k]
print("modules_to_save tensors:", keys)
print("ensure_weight_tying:", json.load(open(f"{out}/adapter_config.json")).get("ensure_weight_tying"))
PY
}
run fsdp_lora accelerate launch --config_file accelerate_config_fsdp_lora.yaml --num_processes 1 scripts/trainer/sharded/fsdp_lora.py
run fsdp_qlora accelerate launch --config_file accelerate_config_fsdp_qlora.yaml --num_processes 1 scripts/trainer/sharded/fsdp_qlora.py
run qlora python3 scripts/trainer/qlora.py
timeout 90 python3 scripts/evaluate_model.py --model_dir /tmp/fsdp_lora > "$OUT/reload.log" 2>&1; echo "reload rc=$?" | tee -a "$LOG"
tail -1 "$OUT/reload.log" | tee -a "$LOG"
echo done | tee -a "$LOG"
