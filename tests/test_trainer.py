"""The two Trainer examples, end to end on the tiny preset: they learn, save, reload and run under DDP."""

import json
import os
import re
import shutil
import time

import pytest

from conftest import accelerate_cpu, read_metrics, run_script, train_losses

METRIC_KEYS = {"eval_accuracy", "eval_loss", "train_runtime_s", "train_tokens_per_second", "peak_memory_gib"}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main job exactly: no arguments, in a fresh folder, data preparation included."""
    cwd = tmp_path_factory.mktemp("fresh")
    start = time.perf_counter()
    proc = run_script("trainer/getting_started.py", cwd=cwd)
    return cwd, cwd / "output/trainer/getting_started", time.perf_counter() - start, proc


def test_main_job_learns_within_budget(main_job):
    cwd, out, seconds, proc = main_job
    metrics = read_metrics(out)
    assert metrics.keys() >= METRIC_KEYS
    assert metrics["eval_accuracy"] >= 0.90, metrics["eval_accuracy"]  # chance is 0.20
    losses = list(train_losses(metrics).values())
    assert losses[-1] < losses[0] / 4
    # The budget is 90 s on a 2-core machine; a loaded CI machine gets some slack.
    assert seconds < 90 * float(os.environ.get("TIME_SLACK", "1.5")), seconds
    print(f"main job: {seconds:.1f} s wall, eval accuracy {metrics['eval_accuracy']:.3f}")
    assert "done:" in proc.stdout and "eval accuracy" in proc.stdout
    assert (cwd / "data/synthetic/info.json").exists()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_curves.png"):
        assert (out / name).exists(), name
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard logs"
    assert not list(out.glob("**/*.bin")) or all(p.name == "training_args.bin" for p in out.glob("**/*.bin"))


def test_saved_model_reloads_and_evaluates_the_same(main_job):
    cwd, out, _, _ = main_job
    proc = run_script("evaluate_model.py", "--model_dir", str(out), cwd=cwd)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = read_metrics(out)
    assert result["eval_accuracy"] == metrics["eval_accuracy"]
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_model_from_local_checkpoint_directory(main_job):
    cwd, out, _, _ = main_job
    local = cwd / "my-checkpoint"
    shutil.copytree(out, local, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    run_script(
        "trainer/getting_started.py",
        "--model",
        str(local),
        "--max_steps",
        "10",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--output_dir",
        "output/from_checkpoint",
        cwd=cwd,
    )
    # Fine-tuning the trained model a little keeps what it knows: it starts from the checkpoint, not from scratch.
    assert read_metrics(cwd / "output/from_checkpoint")["eval_accuracy"] >= 0.90


def test_advanced_usage(workdir):
    out = workdir / "output/advanced"
    proc = run_script("trainer/advanced_usage.py", "--output_dir", str(out), "--target_accuracy", "0.95", cwd=workdir)
    metrics = read_metrics(out)
    assert metrics["eval_accuracy"] >= 0.95
    assert "reached the target" in proc.stdout  # the project's callback stopped the run
    assert metrics["steps"] < 4 * 169 // 2  # before the 4 epochs were over
    # CompletionOnlyTrainer: the loss covers the answer only, so it falls far below the full-text loss (~1.0).
    assert metrics["eval_loss"] < 0.3
    best = metrics["best_checkpoint"]
    assert best and (out / os.path.basename(best)).is_dir()
    assert len(list(out.glob("checkpoint-*"))) <= 2  # save_total_limit


def test_trainer_ddp_two_cpu_processes_matches_single_process(workdir):
    """2 processes x 16 examples make the same global batches as 1 x 32, so the losses agree."""
    common = ["--max_steps", "150", "--logging_steps", "10", "--eval_strategy", "no", "--save_strategy", "no"]
    accelerate_cpu(
        "trainer/getting_started.py",
        *common,
        "--use_cpu",
        "--per_device_train_batch_size",
        "16",
        "--output_dir",
        "output/ddp",
        cwd=workdir,
    )
    run_script(
        "trainer/getting_started.py", *common, "--per_device_train_batch_size", "32", "--output_dir", "output/single", cwd=workdir
    )
    ddp, single = read_metrics(workdir / "output/ddp"), read_metrics(workdir / "output/single")
    assert ddp["num_devices"] == 2 and single["num_devices"] == 1
    # Within the first epoch the two runs see identical batches; only the order of float sums differs.
    assert train_losses(ddp) == pytest.approx(train_losses(single), rel=1e-4)
    assert ddp["eval_accuracy"] >= 0.80


def test_tokens_per_second_leaves_out_the_evaluations_between_epochs():
    """The loops pause the meter around evaluation; the Trainer's callback subtracts each in-training eval_runtime.
    The evaluation after train() ends is outside the clock anyway."""
    from types import SimpleNamespace

    from hftrain.reporting import ThroughputCallback, ThroughputMeter

    meter = ThroughputMeter()
    meter.start()
    time.sleep(0.2)
    with meter.paused():  # an evaluation
        time.sleep(0.4)
    assert 0.15 < meter.stop()["train_runtime_s"] < 0.35

    callback = ThroughputCallback(seq_len=8)
    args, state = SimpleNamespace(world_size=1, n_gpu=0), SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    callback.on_train_begin(args, state, None)
    time.sleep(0.6)
    callback.on_evaluate(args, state, None, metrics={"eval_runtime": 0.4})  # 0.4 of the 0.6 s were evaluation
    state.global_step, state.num_input_tokens_seen = 10, 1000
    callback.on_train_end(args, state, None)
    callback.on_evaluate(args, state, None, metrics={"eval_runtime": 9.0})  # trainer.evaluate() after training
    assert 0.15 < callback.metrics["train_runtime_s"] < 0.35
    assert callback.metrics["train_tokens"] == 1000


QUIET_RUNS = {
    "trainer/getting_started.py": ["--max_steps", "2", "--per_device_eval_batch_size", "600"],
    # TRL's configs turn gradient_checkpointing on, which transformers 5 answers with a deprecation notice
    "trainer/dpo.py": ["--max_steps", "2", "--sft_start_steps", "2", "--num_examples", "64", "--eval_steps", "2"],
}


@pytest.mark.parametrize("script", QUIET_RUNS)
def test_quiet_start(script, workdir, tmp_path):
    """A fresh `python script.py` (every library imported from scratch, as a user runs it) writes nothing to stderr
    but progress bars, and no library line to stdout: the start-up lines a user cannot act on (torchao's .so files,
    torch's Enum deprecation, DeepSpeed's CPU accelerator, bitsandbytes' kernels, PEFT's is_gradient_checkpointing,
    transformers 5's gradient_checkpointing rename)
    are dropped at their source (hftrain/quiet.py); any new one fails here."""
    args = [*QUIET_RUNS[script], "--output_dir", str(tmp_path / "out")]
    proc = run_script(script, *args, cwd=workdir, TQDM_DISABLE="1")  # an environment of its own: a fresh process
    progress = re.compile(r"^\s*(\w[\w ]*: )?\s*\d+%\|.*\|")
    unexpected = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip() and not progress.match(line)]
    assert not unexpected, "\n".join(unexpected)
    assert not [line for line in proc.stdout.splitlines() if "WARNING" in line or "Warning" in line], proc.stdout
