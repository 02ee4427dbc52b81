#!/usr/bin/env bash
# One H200: the QLoRA and memory-table failures, then the one-GPU tests that need no flash-attn.
source .device-kit/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.log
python3 -c "import kernels, huggingface_hub; print('kernels', kernels.__version__, 'hub', huggingface_hub.__version__)" 2>&1 | tee -a $OUT/gpu.log
# Direct reproduction of the memory.py failure with the real exception shown.
timeout 200 python3 scripts/benchmarks/memory.py --model 1b --seq_len 1024 --batch_size 4 --cases full_adamw,lora --steps 3 --warmup_steps 1 --output_dir $OUT/mem > $OUT/memory.log 2>&1; echo "memory.py rc=$?" | tee -a $OUT/gpu.log
tail -30 $OUT/memory.log >> $OUT/gpu.log
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_memory_efficient.py tests/test_gpu.py 2>&1 | tail -60 >> $OUT/gpu.log
echo done >> $OUT/gpu.log
