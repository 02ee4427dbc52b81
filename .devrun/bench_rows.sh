#!/usr/bin/env bash
# The throughput rows that launch the examples (scripts/sdpa/flash_attention.py with the row's flags, numbers read from
# the script's metrics.json), measured again on one H200 as results/throughput/benchmark.json was measured (`1b`
# preset, data/synthetic-long, T = 2048, 5 warm-up steps; 10 measured steps here against 20 there, to stay short), and
# compared with that file row by row.
# P1 is a peer, built in the harness's process as before: the control for the machine's speed. Then the new
# `QLoRA (qlora.py)` row (scripts/trainer/qlora.py as launched), which has no committed figure.
# One H200, about 7 minutes. Writes under "$OUT":
#   rows.json, rows.md   the harness's own output
#   compare.txt          per row: tokens/s per GPU and peak allocated GiB, now and committed, and the ratio
#   machine.txt          the GPU, versions, flash-attn present or not
# Expected: each launched row within ~5% of the committed tokens/s and ~1 GiB of its peak memory, as P1 is (the
# launched script also evaluates and saves once after the measured steps; that is outside the numbers).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
OUT="${OUT:-output/devrun}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
python -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'flash-attn', bool(u.find_spec('flash_attn')), 'liger', bool(u.find_spec('liger_kernel')))" \
    | tee -a "$OUT/machine.txt"
[ -f data/synthetic-long/info.json ] || python scripts/prepare_datasets.py --dataset synthetic-long \
    --num_examples 2000 --max_length 2048 --output_dir data/synthetic-long > "$OUT/prepare.log" 2>&1
CASES="P1: padded + SDPA,SDPA padding-free (block-diagonal mask),FA2 padding-free,FA2 padding-free + compiled layers (big batch)"
timeout 330 python scripts/benchmarks/throughput.py --model 1b --data_dir data/synthetic-long --steps 10 --warmup 5 \
    --case_timeout 150 --cases "$CASES" --output "$OUT/rows" 2>&1 | grep -v Warning | tail -n 30
# trainer/qlora.py as the QLoRA row launches it (no committed figure yet: a new row; it must run and report)
timeout 100 python scripts/benchmarks/throughput.py --model 1b --data_dir data/synthetic-long --steps 10 --warmup 5 \
    --case_timeout 90 --cases "QLoRA (qlora.py)" --append --output "$OUT/rows" 2>&1 | grep -v Warning | tail -n 5
rm -f "$OUT/rows.png"
python - "$OUT" <<'EOF' 2>&1 | tee "$OUT/compare.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
committed = {r["case"]: r for r in json.loads(Path("results/throughput/benchmark.json").read_text())["rows"]}
for r in json.loads((out / "rows.json").read_text())["rows"]:
    old = committed.get(r["case"], {"tokens_per_s_per_gpu": float("nan"), "peak_allocated_gib": float("nan")})
    if "tokens_per_s_per_gpu" not in r:
        print(f"{r['case']}: {r.get('skipped') or r.get('error')}")
        continue
    tps, peak = r["tokens_per_s_per_gpu"], r.get("peak_allocated_gib", 0.0)
    print(
        f"{r['case']}: {tps:,.0f} tokens/s (committed {old.get('tokens_per_s_per_gpu', 0):,.0f}, "
        f"ratio {tps / old.get('tokens_per_s_per_gpu', float('nan')):.3f}); peak {peak:.1f} GiB "
        f"(committed {old.get('peak_allocated_gib', 0):.1f}); {r.get('command', 'built in the harness (peer)')}"
    )
EOF
