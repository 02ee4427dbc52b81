#!/usr/bin/env bash
# One H200: dpo.py, reward_model.py and grpo.py on the `small` preset, briefly (a 20-step SFT start, 40 steps each),
# then one summary JSON: training tokens/s and peak memory of each, generation tokens/s of GRPO, with the machine.
# Run from the repository root: OUT=<folder> bash .devrun/prefrl.sh   (about 4 minutes; writes $OUT/preference-h200.json)
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} HF_HUB_OFFLINE=1 PYTHONPATH="$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK"
COMMON=(--model small --sft_start_steps 20 --max_steps 40 --logging_steps 10 --report_to none --disable_tqdm true)
python "$REPO/scripts/trainer/dpo.py" "${COMMON[@]}" --eval_steps 20 --output_dir "$WORK/dpo" 2>&1 | tail -3
python "$REPO/scripts/trainer/reward_model.py" "${COMMON[@]}" --eval_steps 20 --output_dir "$WORK/reward_model" 2>&1 | tail -3
python "$REPO/scripts/trainer/grpo.py" "${COMMON[@]}" --max_completion_length 32 --output_dir "$WORK/grpo" 2>&1 | tail -3
python - "$WORK" "$OUT/preference-h200.json" <<'PY'
import json, sys
from pathlib import Path
from hftrain.benchmarking import machine

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
keys = ["steps", "train_tokens_per_second", "peak_memory_gib", "peak_reserved_gib", "eval_accuracy_before", "eval_accuracy",
        "eval_rewards/accuracies", "eval_rewards/margins", "eval_margin", "reward_first", "reward_last",
        "generation_tokens", "generation_seconds", "generation_tokens_per_second", "train_runtime_s"]
runs = {}
for name in ("dpo", "reward_model", "grpo"):
    path = work / name / "metrics.json"
    if not path.exists():  # that run failed or was stopped: its output above says why
        runs[name] = {"error": "no metrics.json"}
        continue
    m = json.loads(path.read_text())
    runs[name] = {k: m[k] for k in keys if k in m}
summary = {**machine("torch", "transformers", "trl", "peft", "accelerate"), "model": "small",
           "command": "bash .devrun/prefrl.sh (--sft_start_steps 20 --max_steps 40; grpo --max_completion_length 32)", "runs": runs}
dest.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
