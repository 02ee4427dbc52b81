#!/bin/bash
# One H200: the GPU tests that evaluate a saved output with scripts/evaluate_model.py (now a plain evaluation loop,
# no Trainer: a 4-bit full model evaluates) and a 4-bit full model on the GPU. Expect: 3 tests passed, and one JSON line.
# Results in $OUT. About 3-5 minutes.
set -x
export HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python -m pytest -m gpu -q -x -n 0 tests/test_gpu.py::test_getting_started_one_gpu_bf16_small \
    tests/test_gpu_memory_efficient.py::test_qlora_one_gpu_paged_adamw_8bit \
    "tests/test_gpu_attention.py::test_fastest_recipe_flags_learn_and_save[bf16]" 2>&1 | tail -30 | tee "$OUT/pytest.txt"
cd "$(mktemp -d)" && PYTHONPATH="$OLDPWD/scripts" python "$OLDPWD/scripts/trainer/getting_started.py" --model small --max_steps 20 \
    --output_dir gs > /dev/null 2>&1
PYTHONPATH="$OLDPWD/scripts" python "$OLDPWD/scripts/evaluate_model.py" --model_dir gs --load_in_4bit 2>&1 | tail -1 | tee "$OUT/eval_4bit_full.json"
