#!/usr/bin/env bash
# One H200: scripts/benchmarks/streaming.py, --streaming on a generated 2 GB corpus against prepared data, the
# training on the GPU (tiny preset, the real tokenizer: SmolLM2-135M-Instruct's). About 3 minutes.
# The machine has no network: copy the tokenizer beside the project first and carry it (data/ is git-ignored):
#   mkdir -p data/smollm2-tokenizer && cp $(python tests/real_checkpoint.py)/tokenizer* data/smollm2-tokenizer/
# Writes $OUT/streaming/streaming.json and streaming.md, and $OUT/streaming.log.
source .device-kit/setup.sh
TOK=${TOKENIZER:-data/smollm2-tokenizer}
if [ ! -f "$TOK/tokenizer.json" ]; then
  echo "no $TOK/tokenizer.json: see the comment at the top" | tee "$OUT/streaming.log"; exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.log"
nproc >> "$OUT/gpu.log"; df -h /tmp >> "$OUT/gpu.log"
timeout 220 python3 scripts/benchmarks/streaming.py --tokenizer "$TOK" --workdir /tmp --output_dir "$OUT/streaming" \
  --max_steps 300 --prepared_mb 20 > "$OUT/streaming.log" 2>&1
echo "streaming.py rc=$?" | tee -a "$OUT/gpu.log"
grep -v "Warning\|warn(" "$OUT/streaming.log" | tail -20
