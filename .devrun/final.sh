#!/usr/bin/env bash
# One H200, one call: the one-GPU tests of the code changed this session (loading, evaluation, the loops, QLoRA,
# SDPA kernels) that need no flash-attn build, then the preference/RL scripts' figures. Summary in $OUT/final.log.
source .device-kit/setup.sh > $OUT/final.log 2>&1
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $OUT/final.log
echo "== pytest (one GPU)" >> $OUT/final.log
timeout 250 python3 -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_gpu_memory_efficient.py::test_qlora_one_gpu_paged_adamw_8bit \
  tests/test_gpu.py::test_getting_started_one_gpu_bf16_small \
  "tests/test_gpu_custom_loops.py::test_loop_learns_on_one_gpu" \
  "tests/test_gpu_attention.py::test_math_kernel_each_backend" \
  "tests/test_gpu_attention.py::test_padding_free_equals_padded_in_bf16[sdpa]" 2>&1 | grep -v "Warning\|^  \"\"\"" | tail -25 >> $OUT/final.log
echo "== prefrl" >> $OUT/final.log
mkdir -p $OUT/pref
OUT=$OUT/pref timeout 230 bash .devrun/prefrl.sh > $OUT/prefrl.log 2>&1; echo "prefrl rc=$?" >> $OUT/final.log
tail -5 $OUT/prefrl.log >> $OUT/final.log
echo done >> $OUT/final.log
