#!/usr/bin/env bash
# ZeRO-3 resume on one CUDA GPU (bf16), through the checks of scripts/hftrain/checkpoints.py: the files DeepSpeed
# loads with torch.load(weights_only=False) (checkpoint-N/global_step*/...) must load with weights_only=True first,
# allowing only DeepSpeed's ZeroStageEnum and loss scalers. Expected: the list of non-torch globals in each file
# (only those DeepSpeed classes), "unpicklable: None", and the resumed run ending at step 8 ("resuming from .../checkpoint-4").
# Run from the repository root; results in "$OUT". About 2 minutes on one H200.
set -euo pipefail
ROOT=$PWD
OUT=${OUT:-$ROOT/.devrun/out}
mkdir -p "$OUT"
export PYTHONPATH=$ROOT/scripts HF_HUB_OFFLINE=1
WORK=$(mktemp -d)
cd "$WORK"
RUN=(python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
     "$ROOT/scripts/trainer/sharded/zero.py" --deepspeed "$ROOT/deepspeed_config.json" --per_device_train_batch_size 16
     --save_strategy steps --save_steps 4 --eval_strategy no --output_dir "$WORK/zero")
"${RUN[@]}" --max_steps 4 > "$OUT/first.log" 2>&1 || { tail -30 "$OUT/first.log"; exit 1; }
python - "$WORK/zero/checkpoint-4" > "$OUT/check.txt" 2>&1 <<'PY'
import sys
from pathlib import Path

import torch

from hftrain.checkpoints import checkpoint_files, unpicklable_file

folder = Path(sys.argv[1])
for path in checkpoint_files(folder):
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        print(path.relative_to(folder), torch.serialization.get_unsafe_globals_in_checkpoint(path))
print("unpicklable:", unpicklable_file(folder))
PY
cat "$OUT/check.txt"
"${RUN[@]}" --max_steps 8 --resume_from_checkpoint latest > "$OUT/resume.log" 2>&1 || { tail -30 "$OUT/resume.log"; exit 1; }
grep -E "resuming from|^done:" "$OUT/resume.log" | tee "$OUT/summary.txt"
