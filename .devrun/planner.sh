#!/usr/bin/env bash
# The planner (scripts/plan.py) against configurations measured after it was fitted: shapes, sequence lengths and
# micro-batches none of its calibration rows has. One H200, under 6 minutes. Writes under "$OUT"/planner/:
#   qwen2.5-0.5b-T2048.{json,md}  the qwen2.5-0.5b shape (151,936-token vocabulary), P2: 8 blocks of 2048 tokens
#   qwen2.5-0.5b-T4096.{json,md}  the same shape, P3 compiled layers + fused loss: 16 rows of 4096 tokens (asked 8, as above)
#   llama-3.2-1b-T1024.{json,md}  the llama-3.2-1b shape, P3 with Liger: 16 rows of 1024 tokens (asked 24: --big_batch was not passed on before the fix in throughput.py)
#   machine.txt, check.txt        the GPU and versions; python scripts/plan.py --check over the three files
# Commit the JSON and .md files as results/throughput/after-fit-<name>.{json,md}: tests/test_plan.py checks every
# results/*/*.json, and the planner is not fitted on them (hftrain.planner.CALIBRATION_FILES).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
OUT="${OUT:-output/devrun}"
mkdir -p "$OUT/planner"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/planner/machine.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/planner/machine.txt"
[ -f data/synthetic-long/info.json ] || python scripts/prepare_datasets.py --dataset synthetic-long \
    --num_examples 2000 --max_length 2048 --output_dir data/synthetic-long
bench() { timeout "$1" python scripts/benchmarks/throughput.py --data_dir data/synthetic-long --steps 6 --warmup 3 \
    --case_timeout "$(($1 - 15))" "${@:2}" 2>&1 | grep -v Warning | tail -n 25 || echo "(failed or stopped: ${*:2})"; }
bench 110 --model qwen2.5-0.5b --seq_len 2048 --cases "P2: 2048-token blocks + SDPA" \
    --output "$OUT/planner/qwen2.5-0.5b-T2048"
bench 140 --model qwen2.5-0.5b --seq_len 4096 --big_batch 8 \
    --cases "P3: blocks + compiled layers + fused loss (big batch)" --output "$OUT/planner/qwen2.5-0.5b-T4096"
bench 110 --model llama-3.2-1b --seq_len 1024 --big_batch 24 --cases "P3: blocks + Liger (big batch)" \
    --output "$OUT/planner/llama-3.2-1b-T1024"
rm -f "$OUT"/planner/*.png  # at most 8 files come back from a device run
python scripts/plan.py --check "$OUT"/planner/*.json 2>&1 | grep -v Warning | tee "$OUT/planner/check.txt"
