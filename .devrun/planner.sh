#!/usr/bin/env bash
# The planner (scripts/plan.py) against configurations measured after it was fitted: shapes, sequence lengths and
# micro-batches none of its calibration rows has. One H200, about 4-5 minutes. Writes under "$OUT"/planner/:
#   qwen2.5-0.5b-T4096.{json,md,png}  the qwen2.5-0.5b shape (151,936-token vocabulary), rows of 4096 tokens:
#                                     P2 (8 rows) and P3 compiled layers + fused loss (8 rows)
#   llama-3.2-1b-T1024.{json,md,png}  the llama-3.2-1b shape, rows of 1024 tokens: P3 with Liger at 24 rows
#   check.txt                         python scripts/plan.py --check over both files (predicted against measured)
# Commit the two JSON files (and their .md) as results/throughput/after-fit-*.{json,md}; tests/test_plan.py checks
# every results/*/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
OUT="${OUT:-output/devrun}"
mkdir -p "$OUT/planner"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/planner/machine.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/planner/machine.txt"
[ -f data/synthetic-long/info.json ] || python scripts/prepare_datasets.py --dataset synthetic-long \
    --num_examples 2000 --max_length 2048 --output_dir data/synthetic-long
bench() { timeout 170 python scripts/benchmarks/throughput.py --data_dir data/synthetic-long --steps 8 --warmup 3 \
    --case_timeout 150 "$@" 2>&1 | grep -v Warning | tail -n 25 || echo "(failed or stopped: $*)"; }
bench --model qwen2.5-0.5b --seq_len 4096 --big_batch 8 \
    --cases "P2: 2048-token blocks + SDPA,P3: blocks + compiled layers + fused loss (big batch)" \
    --output "$OUT/planner/qwen2.5-0.5b-T4096"
bench --model llama-3.2-1b --seq_len 1024 --big_batch 24 --cases "P3: blocks + Liger (big batch)" \
    --output "$OUT/planner/llama-3.2-1b-T1024"
python scripts/plan.py --check "$OUT"/planner/*.json 2>&1 | grep -v Warning | tee "$OUT/planner/check.txt"
