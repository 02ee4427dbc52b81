"""GPU checks (pytest -m gpu), run through the device tool; skipped without CUDA."""

import json
import sys

import pytest
import torch

from conftest import SCRIPTS, read_metrics, run, run_script

pytestmark = pytest.mark.gpu
GS = "trainer/getting_started.py"
SMALL = ["--model", "small", "--learning_rate", "5e-4", "--num_train_epochs", "2"]


def test_getting_started_one_gpu_bf16_small(workdir):
    out = workdir / "output/gpu1"
    run_script(GS, *SMALL, "--output_dir", str(out), cwd=workdir, CUDA_VISIBLE_DEVICES="0")
    m = read_metrics(out)
    print("1 GPU small:", {k: m[k] for k in ("eval_accuracy", "train_tokens_per_second", "mfu", "peak_memory_gib", "device")})
    assert m["eval_accuracy"] >= 0.90 and m["num_devices"] == 1
    assert m["mfu"] is not None and 0 < m["mfu"] < 1 and m["peak_memory_gib"] > 0.1
    assert json.loads((out / "config.json").read_text())["dtype"] in ("float32", "bfloat16")
    proc = run_script("evaluate_model.py", "--model_dir", str(out), cwd=workdir, CUDA_VISIBLE_DEVICES="0")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] == pytest.approx(m["eval_accuracy"], abs=0.02)  # bf16 weights vs bf16 autocast


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_getting_started_ddp_two_gpus(workdir):
    out = workdir / "output/gpu_ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(SCRIPTS.parent / "accelerate_config.yaml"),
        "--num_processes",
        "2",
        str(SCRIPTS / GS),
        *SMALL,
        "--per_device_train_batch_size",
        "16",
        "--output_dir",
        str(out),
    ]
    run(cmd, cwd=workdir)
    m = read_metrics(out)
    print("2 GPU DDP small:", {k: m[k] for k in ("eval_accuracy", "train_tokens_per_second", "mfu", "peak_memory_gib")})
    assert m["num_devices"] == 2 and m["eval_accuracy"] >= 0.90


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_getting_started_plain_python_uses_every_gpu(workdir):
    out = workdir / "output/gpu_dp"
    proc = run_script(GS, "--max_steps", "200", "--output_dir", str(out), cwd=workdir, CUDA_VISIBLE_DEVICES="0,1")
    m = read_metrics(out)
    assert m["num_devices"] == 2  # DataParallel over both GPUs in one process
    assert m["eval_accuracy"] >= 0.80, proc.stdout[-2000:]
