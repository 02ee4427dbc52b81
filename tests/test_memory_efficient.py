"""QLoRA, GaLore, NEFTune and the memory table on the tiny preset, CPU: they learn, reload, refuse early."""

import json
from pathlib import Path

import pytest
import torch

from conftest import accelerate_cpu, read_metrics, run_script, train_losses
from hftrain.sharing import adapter_base

# Two shared cores: one thread per process. With two, bitsandbytes' CPU kernels slow down
# tens of times on a busy machine (thread oversubscription), and every run here is tiny.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = ["--report_to", "none", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def qlora_run(workdir):
    """120 steps with an evaluation at step 60: training must go on learning after it (the CPU trap)."""
    out = workdir / "output/qlora"
    args = ["--output_dir", str(out), "--max_steps", "120", "--eval_strategy", "steps", "--eval_steps", "60", *SHORT]
    proc = run_script("trainer/qlora.py", *args, cwd=workdir, **ONE_THREAD)
    return out, proc


def test_qlora_learns_on_a_4bit_base(qlora_run):
    out, proc = qlora_run
    metrics = read_metrics(out)
    assert metrics["optim"] == "adamw_bnb_8bit"  # CPU: bitsandbytes' 8-bit AdamW, unpaged
    assert metrics["eval_accuracy"] >= 0.6, metrics["eval_accuracy"]  # chance is 0.20
    evals = [r["eval_accuracy"] for r in metrics["log_history"] if "eval_accuracy" in r]
    assert evals[-1] > evals[0] + 0.1, evals  # still learning after the step-60 evaluation
    losses = list(train_losses(metrics).values())
    assert losses[-1] < losses[0] / 3
    assert "trainable params:" in proc.stdout and "done:" in proc.stdout
    # The adapter only (a full model would be config.json + model.safetensors), on a base that loads from anywhere.
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"  # relative: shareable
    assert Path(adapter_base(str(out))) == (out / "base").resolve() and (out / "base/model.safetensors").exists()


def test_qlora_adapter_reloads_in_4bit_and_evaluates_the_same(qlora_run, workdir):
    out, _ = qlora_run
    proc = run_script("evaluate_model.py", "--model_dir", str(out), "--load_in_4bit", cwd=workdir, **ONE_THREAD)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = read_metrics(out)
    assert result["adapter"] and result["load_in_4bit"]
    assert result["eval_accuracy"] == metrics["eval_accuracy"]  # the same NF4 weights: quantization is deterministic
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


def has_avx512_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text()


def _lora_b_grads_after_eval_pass(base: str, tokenizer, batch: dict, workaround: bool) -> list:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from hftrain.models import load_model
    from hftrain.quantization import load_4bit, nf4_config

    cpu = torch.device("cpu")
    if workaround:
        model = load_4bit(base, tokenizer, torch.float32, cpu)
    else:
        model = load_model(base, tokenizer, quantization_config=nf4_config(torch.float32), device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.eval()  # what Trainer.evaluate does: eval mode, no grad
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    # lora_B starts at zero, so lora_A's first gradients are zero by design; lora_B's must not be.
    return [p.grad for n, p in model.named_parameters() if "lora_B" in n]


def test_lora_gradients_survive_an_eval_pass_in_4bit_on_cpu(workdir, tmp_path):
    from transformers import set_seed

    from hftrain.data import PadCollator, load_prepared
    from hftrain.models import save_preset_base

    data = load_prepared(str(workdir / "data/synthetic"))
    set_seed(0)
    base = save_preset_base("tiny", data.tokenizer, str(tmp_path))
    batch = PadCollator(data.tokenizer)([data.train[i] for i in range(8)])
    batch.pop("prompt_len")

    grads = _lora_b_grads_after_eval_pass(base, data.tokenizer, batch, workaround=True)
    assert len(grads) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(g is not None and g.abs().sum() > 0 for g in grads), [None if g is None else float(g.abs().sum()) for g in grads]

    # Without the workaround, on a CPU with AVX512-BF16, the trap shows: this test really exercises it.
    if has_avx512_bf16():
        trapped = _lora_b_grads_after_eval_pass(base, data.tokenizer, batch, workaround=False)
        assert any(g is None or g.abs().sum() == 0 for g in trapped), (
            "bitsandbytes no longer breaks LoRA gradients after an eval pass; skip_cpu_4bit_repacking may be dropped"
        )


@pytest.fixture(scope="module")
def galore_run(workdir):
    out = workdir / "output/galore"
    args = ["--output_dir", str(out), "--max_steps", "150", "--eval_strategy", "no", *SHORT]
    proc = run_script("trainer/galore.py", *args, cwd=workdir, **ONE_THREAD)
    return out, proc


def test_galore_learns(galore_run):
    out, _ = galore_run
    metrics = read_metrics(out)
    assert metrics["optim"] == "galore_adamw" and "rank=16" in metrics["optim_args"]
    assert metrics["eval_accuracy"] >= 0.6, metrics["eval_accuracy"]
    losses = list(train_losses(metrics).values())
    assert losses[-1] < losses[0] / 3
    assert (out / "model.safetensors").exists()  # full fine-tuning: every weight was trained and is saved


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim", "galore_adamw_8bit"], "--optim galore_adamw_8bit needs a CUDA GPU"),
        (
            ["--optim", "galore_adamw_layerwise", "--gradient_accumulation_steps", "2"],
            "--optim galore_adamw_layerwise cannot accumulate gradients",
        ),
    ],
    ids=["8bit-on-cpu", "layerwise-accumulation"],
)
def test_galore_refuses_before_loading(workdir, args, message):
    out = workdir / "output/galore_refused"
    proc = run_script("trainer/galore.py", "--output_dir", str(out), *args, cwd=workdir, check=False, **ONE_THREAD)
    assert proc.returncode == 1
    assert f"error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()  # one sentence, nothing trained or written


def test_galore_layerwise_refuses_several_processes(workdir):
    out = workdir / "output/galore_ddp_refused"
    proc = accelerate_cpu(
        "trainer/galore.py", "--output_dir", str(out), "--optim", "galore_adamw_layerwise", "--use_cpu", cwd=workdir, check=False
    )
    assert proc.returncode == 1
    assert "error: --optim galore_adamw_layerwise steps each parameter inside backward and runs in one process" in proc.stderr
    assert not out.exists()


def test_neftune_reports_both_runs(workdir):
    out = workdir / "output/neftune"
    args = ["--output_dir", str(out), "--max_steps", "200", "--per_device_train_batch_size", "16", "--eval_strategy", "no"]
    args += ["--report_to", "none"]
    proc = run_script("trainer/neftune.py", *args, cwd=workdir, **ONE_THREAD)
    noisy, baseline = read_metrics(out), read_metrics(out / "baseline")
    assert noisy["neftune_noise_alpha"] == 0.5
    assert noisy["baseline_eval_accuracy"] == baseline["eval_accuracy"]
    assert min(noisy["eval_accuracy"], baseline["eval_accuracy"]) >= 0.6, (noisy["eval_accuracy"], baseline["eval_accuracy"])
    # Same seed, same batches: the first loss (before any update) is the same up to the noise, later ones differ.
    first = lambda m: next(iter(train_losses(m).values()))  # noqa: E731
    assert first(noisy) == pytest.approx(first(baseline), rel=0.05)
    assert train_losses(noisy) != train_losses(baseline)  # the noise really was on while training
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("neftune:") and f"{noisy['eval_accuracy']:.3f}" in summary
    assert f"{baseline['eval_accuracy']:.3f} without" in summary


def test_memory_table_smoke(workdir):
    out = workdir / "output/memory_smoke"
    proc = run_script("benchmarks/memory.py", "--smoke", "--output_dir", str(out), cwd=workdir, **ONE_THREAD)
    report = json.loads((out / "memory.json").read_text())
    cases = {r["case"]: r for r in report["results"]}
    assert set(cases) == {"full_adamw", "full_adamw_8bit", "galore_adamw", "lora", "qlora"}  # the CPU-capable ones
    assert all("error" not in r and r["tokens_per_second"] > 0 for r in cases.values()), cases
    assert report["settings"]["model"] == "tiny" and report["versions"]["bitsandbytes"]
    # What the techniques shrink shows even on tiny: trainable parameters and optimizer state.
    assert cases["lora"]["trainable_parameters"] < cases["full_adamw"]["trainable_parameters"] / 2
    assert cases["galore_adamw"]["optimizer_state_bytes"] < cases["full_adamw"]["optimizer_state_bytes"]
    assert cases["full_adamw_8bit"]["optimizer_state_bytes"] < cases["full_adamw"]["optimizer_state_bytes"]
    assert cases["qlora"]["model_bytes"] < cases["lora"]["model_bytes"]
    assert "| qlora |" in (out / "memory.md").read_text() and "done: 5 cases" in proc.stdout
