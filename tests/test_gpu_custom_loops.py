"""GPU checks of the hand-written loops (pytest -m gpu; skipped without CUDA): all four on one GPU in bf16,
the accelerate twins on two GPUs (DDP). Each prints tokens/s and peak memory from metrics.json."""

import sys

import pytest
import torch

from conftest import SCRIPTS, read_metrics, run, run_script, train_losses

pytestmark = pytest.mark.gpu
LOOPS = ["basic/custom_loop.py", "basic/custom_loop_accelerate.py", "lora/custom_loop.py", "lora/custom_loop_accelerate.py"]
TINY = ["--num_train_epochs", "2"]  # the default data: 2 x 169 steps of 32 examples
# The ~100M preset for a throughput figure: too few steps to learn the task, enough for the loss to fall.
SMALL = ["--model", "small", "--max_steps", "60", "--warmup_steps", "10", "--logging_steps", "10"]
SMALL_LR = {"basic": "5e-4", "lora": "2e-3"}
REPORTED = ("eval_accuracy", "train_tokens_per_second", "train_tokens_per_second_per_device", "mfu", "peak_memory_gib", "device")


def output_dir(workdir, script: str, tag: str):
    return workdir / "output/gpu_custom_loops" / f"{script.removesuffix('.py').replace('/', '_')}_{tag}"


def report(label: str, metrics: dict) -> None:
    print(f"{label}: " + ", ".join(f"{k}={metrics[k]}" for k in REPORTED))


@pytest.mark.parametrize("script", LOOPS)
def test_loop_learns_on_one_gpu(workdir, script):
    out = output_dir(workdir, script, "1gpu")
    run_script(script, *TINY, "--output_dir", str(out), cwd=workdir, CUDA_VISIBLE_DEVICES="0")
    m = read_metrics(out)
    report(f"{script} tiny, 1 GPU", m)
    assert m["num_devices"] == 1 and m["device"] != "cpu" and m["peak_memory_kind"] == "cuda_max_allocated"
    assert m["eval_accuracy"] >= 0.8, m["eval_accuracy"]  # bf16 autocast; chance is 0.2


@pytest.mark.parametrize("script", LOOPS)
def test_small_preset_throughput_on_one_gpu(workdir, script):
    out = output_dir(workdir, script, "small")
    lr = SMALL_LR[script.split("/")[0]]
    run_script(script, *SMALL, "--learning_rate", lr, "--output_dir", str(out), cwd=workdir, CUDA_VISIBLE_DEVICES="0")
    m = read_metrics(out)
    report(f"{script} small, 1 GPU", m)
    losses = list(train_losses(m).values())
    assert losses[-1] < losses[0]
    assert m["mfu"] is not None and 0 < m["mfu"] < 1 and m["peak_memory_gib"] > 0.1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("script", [s for s in LOOPS if s.endswith("_accelerate.py")])
def test_accelerate_loop_on_two_gpus(workdir, script):
    out = output_dir(workdir, script, "2gpu")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(SCRIPTS.parent / "accelerate_config.yaml"),
        "--num_processes",
        "2",
        str(SCRIPTS / script),
        *TINY,
        "--per_device_train_batch_size",
        "16",  # x 2 GPUs: the global batch of 32 of the one-GPU runs
        "--output_dir",
        str(out),
    ]
    run(cmd, cwd=workdir)
    m = read_metrics(out)
    report(f"{script} tiny, 2 GPUs (DDP)", m)
    assert m["num_devices"] == 2 and len(m["train_tokens_per_process"]) == 2
    assert m["eval_accuracy"] >= 0.8, m["eval_accuracy"]
    assert m["eval_samples"] == 600  # gather_for_metrics: every test example once
