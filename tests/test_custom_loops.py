"""The hand-written loops (scripts/basic, scripts/lora): they learn, train data-parallel like one process,
evaluate every example once, resume exactly, keep the LoRA base frozen, and differ from their twins only
by their technique.

Runs are shared through module fixtures: four trainings, one resume, all on a small prepared task whose
splits (2,709 train, 301 test) divide neither by two processes nor by the batch sizes.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_cpu, assert_twins, first_screen, read_metrics, run_script, train_losses

ODD_DATA = "data/odd"
COMMON = ["--data_dir", ODD_DATA, "--num_train_epochs", "2", "--logging_steps", "10"]
SINGLE = [*COMMON, "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2"]  # 16 x 2 = 32 per step
DDP = [*COMMON, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]  # 2 processes x 8 x 2 = 32
SINGLE_NO_ACCUMULATION = [*COMMON, "--per_device_train_batch_size", "32"]
# One thread per process: on a shared 2-core machine, two threads per process mostly wait for each other.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FILES = ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "training_curves.png")


@pytest.fixture(scope="module")
def odd_data(workdir: Path) -> Path:
    from hftrain.data import PrepareArguments, prepare

    path = prepare(PrepareArguments(output_dir=str(workdir / ODD_DATA), num_examples=3010))  # 10% held out: 301 test examples
    info = json.loads((path / "info.json").read_text())
    assert (info["num_train"], info["num_test"]) == (2709, 301)
    return path


def steps_per_epoch(num_train: int = 2709, batch: int = 16, accumulation: int = 2) -> int:
    return math.ceil(math.ceil(num_train / batch) / accumulation)  # 85


@pytest.fixture(scope="module")
def basic_single(workdir, odd_data):
    out = workdir / "output/custom_loops/basic"
    proc = run_script("basic/custom_loop.py", *SINGLE, "--output_dir", str(out), cwd=workdir, **ONE_THREAD)
    return out, proc


@pytest.fixture(scope="module")
def basic_ddp(workdir, odd_data):
    """Checkpoints every 130 steps and at each epoch end (85, 170), all kept, for the resume test."""
    out = workdir / "output/custom_loops/basic_ddp"
    args = ["--checkpointing_steps", "130", "--save_total_limit", "0", "--output_dir", str(out)]
    proc = accelerate_cpu("basic/custom_loop_accelerate.py", *DDP, *args, cwd=workdir)
    return out, proc


@pytest.fixture(scope="module")
def lora_single(workdir, odd_data):
    out = workdir / "output/custom_loops/lora"
    # 32 examples per step like the others, without accumulation: the fastest way on one device.
    args = [*SINGLE_NO_ACCUMULATION, "--merge_and_save", "--output_dir", str(out)]
    proc = run_script("lora/custom_loop.py", *args, cwd=workdir, **ONE_THREAD)
    return out, proc


@pytest.fixture(scope="module")
def lora_ddp(workdir, odd_data):
    out = workdir / "output/custom_loops/lora_ddp"
    proc = accelerate_cpu("lora/custom_loop_accelerate.py", *DDP, "--output_dir", str(out), cwd=workdir)
    return out, proc


@pytest.fixture(scope="module")
def evaluate_saved(odd_data):
    """One process, no accelerate: the reference that the scripts' own evaluations must equal."""
    from torch.utils.data import DataLoader

    from hftrain.data import PadCollator, load_prepared
    from hftrain.loops import evaluate
    from hftrain.metrics import Accuracy

    data = load_prepared(str(odd_data))
    loader = DataLoader(data.test, batch_size=64, collate_fn=PadCollator(data.tokenizer))

    def run(model: torch.nn.Module) -> dict[str, float]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see ONE_THREAD
        try:
            return evaluate(model, loader, Accuracy(data.answer_token_ids), show_progress=False)
        finally:
            torch.set_num_threads(threads)

    return run


def assert_same_eval(result: dict[str, float], metrics: dict, loss_rtol: float = 1e-5) -> None:
    # Accuracy counts whole examples (k / 301): it is equal or an example was dropped, duplicated or changed.
    # The loss sums the same per-token terms grouped into other batches (other padding): float noise only.
    assert result["eval_samples"] == metrics["eval_samples"] == 301
    assert result["eval_accuracy"] == metrics["eval_accuracy"]
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=loss_rtol)


# ---------------------------------------------------------------- twins differ only by their technique

ACCELERATE_WORDS = ("accelerat", "process", "ddp", "prepare", "gather", "checkpoint", "resum", "set_epoch")
LORA_WORDS = ("lora", "peft", "adapter", "merge", "base", "trainable", "modules_to_save")
TWINS = [
    ("basic/custom_loop.py", "basic/custom_loop_accelerate.py", ACCELERATE_WORDS),
    ("lora/custom_loop.py", "lora/custom_loop_accelerate.py", ACCELERATE_WORDS),
    ("basic/custom_loop.py", "lora/custom_loop.py", LORA_WORDS),
    ("basic/custom_loop_accelerate.py", "lora/custom_loop_accelerate.py", LORA_WORDS),
]


@pytest.mark.parametrize("base, variant, words", TWINS, ids=[f"{a}->{b}" for a, b, _ in TWINS])
def test_twins_differ_only_by_their_technique(base, variant, words):
    """Like accelerate's by_feature examples: every statement or comment the variant adds or rewrites names its
    technique; a statement of the base may only disappear where a technique statement takes its place."""
    assert_twins(base, variant, words, min_statements=60)


@pytest.mark.parametrize("script", ["lora/custom_loop.py", "lora/custom_loop_accelerate.py"])
def test_lora_is_on_the_first_screen(script):
    screen = first_screen(script)
    assert "def main()" in screen and "LoraConfig(" in screen and "get_peft_model(model, lora_config)" in screen


# ---------------------------------------------------------------- basic: one device, DDP, evaluation, resume


def test_basic_single_device_learns(basic_single):
    out, proc = basic_single
    metrics = read_metrics(out)
    assert metrics["eval_accuracy"] >= 0.8, metrics["eval_accuracy"]  # chance is 0.2
    losses = list(train_losses(metrics).values())
    assert losses[-1] < losses[0] / 4
    assert metrics["steps"] == 2 * steps_per_epoch() and metrics["num_devices"] == 1 and metrics["eval_samples"] == 301
    assert metrics["distributed_type"] == "NO"
    evals = [row for row in metrics["log_history"] if "eval_loss" in row]
    assert [row["step"] for row in evals] == [85, 170]  # one evaluation per epoch
    for name in FILES:
        assert (out / name).exists(), name
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard logs"
    assert "done: 170 steps" in proc.stdout


def test_basic_ddp_trains_data_parallel_like_one_process(basic_single, basic_ddp):
    """2 processes x 8 examples x 2 micro-batches make the same global batches as 1 x 16 x 2."""
    single, ddp = read_metrics(basic_single[0]), read_metrics(basic_ddp[0])
    assert ddp["num_devices"] == 2 and ddp["eval_accuracy"] >= 0.8
    # Each process read half of every global batch: half the tokens each. (Not exactly half: its examples differ
    # in length; and at each epoch end accelerate repeats 15 examples so that both processes get a full batch.)
    per_process = ddp["train_tokens_per_process"]
    assert len(per_process) == 2 and all(0.45 < n / single["train_tokens"] < 0.55 for n in per_process)
    assert sum(per_process) == pytest.approx(single["train_tokens"], rel=0.01)
    # Until the last step of the first epoch both runs take identical steps on identical global batches: they
    # differ only in the order of float32 sums (two half-batches padded to their own lengths, the gradient
    # all-reduce). Measured: 1e-7 relative at most over the 80 steps. rel=1e-5 leaves a 100x margin yet catches
    # real mistakes: dividing by each process's own target tokens instead of the global count (each process
    # normalising its half) is already 9e-3 off at step 10. The last step of the epoch differs by design: there
    # accelerate repeats a few examples so that both processes get a full batch.
    first_epoch = [s for s in train_losses(single) if s < steps_per_epoch()]
    assert len(first_epoch) == 8
    ddp_losses, single_losses = train_losses(ddp), train_losses(single)
    for step in first_epoch:
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-5), step


def test_distributed_evaluation_counts_every_example_once(basic_ddp, evaluate_saved):
    """301 test examples over 2 processes in batches of 64: accelerate pads the last round with repeated
    examples, which gather_for_metrics must drop. The 2-process result equals one process on the same weights."""
    from transformers import AutoModelForCausalLM

    out, _ = basic_ddp
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_same_eval(evaluate_saved(model), read_metrics(out))


def test_resume_from_checkpoint_ends_with_the_same_weights(workdir, basic_ddp):
    """A run stopped after checkpoint-130 (45 steps into the 2nd epoch) and resumed equals the uninterrupted run."""
    full, _ = basic_ddp
    out = workdir / "output/custom_loops/basic_resumed"
    shutil.copytree(full / "checkpoint-130", out / "checkpoint-130")  # what the stopped run left behind
    proc = accelerate_cpu(
        "basic/custom_loop_accelerate.py", *DDP, "--resume_from_checkpoint", "latest", "--output_dir", str(out), cwd=workdir
    )
    assert proc.stdout.count("resuming from") == 1  # from the main process alone
    assert f"resuming from {out / 'checkpoint-130'} at step 130" in proc.stdout
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(full / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    # Same processes, same batches in the same order, same RNG: on CPU the result is bit-identical in practice;
    # the tolerance only allows for a BLAS that is not deterministic. A wrong data order or a lost optimizer
    # state after resuming would move the weights by far more (learning rate 3e-3 per step).
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    m_resumed, m_full = read_metrics(out), read_metrics(full)
    assert m_resumed["distributed_type"] == m_full["distributed_type"] == "MULTI_CPU"
    assert m_resumed["steps"] == 170 and m_resumed["train_tokens"] < 0.3 * m_full["train_tokens"]  # 40 of 170 steps
    assert train_losses(m_resumed) == pytest.approx(train_losses(m_full), rel=1e-5)  # history restored, then continued
    assert m_resumed["eval_accuracy"] == m_full["eval_accuracy"]


# ---------------------------------------------------------------- LoRA


def base_weights_of(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen base's tensors inside a PEFT model's state dict, under the plain model's names."""
    return {
        k.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in peft_state.items()
        if "lora_" not in k and ".modules_to_save." not in k
    }


def initial_weights(odd_data: Path) -> dict[str, torch.Tensor]:
    """The tiny preset as the scripts build it before training: random weights from --seed (42)."""
    from transformers import set_seed

    from hftrain.data import load_prepared
    from hftrain.models import load_model

    set_seed(42)
    return load_model("tiny", load_prepared(str(odd_data)).tokenizer).state_dict()


def test_lora_single_device_learns_and_reloads(lora_single, odd_data, evaluate_saved):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hftrain.sharing import adapter_base

    out, proc = lora_single
    metrics = read_metrics(out)
    assert metrics["eval_accuracy"] >= 0.8, metrics["eval_accuracy"]
    assert "trainable params:" in proc.stdout
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"  # relative to the adapter's folder, which can move or be shared
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 2 * 7  # all-linear: 7 per block

    # The saved base is the preset's initial weights, bit for bit.
    base = load_file(out / "base/model.safetensors")
    initial = initial_weights(odd_data)
    assert base.keys() == initial.keys() and all(torch.equal(base[k], initial[k]) for k in base)

    # After training the base under the adapter is still that one: the merged model is base + (alpha / r)·B·A where
    # LoRA sits (float tolerance of one matmul), the trained copy for the two modules_to_save, the base bit for bit
    # everywhere else (the norms).
    adapter, merged_weights = load_file(out / "adapter_model.safetensors"), load_file(out / "merged/model.safetensors")
    assert merged_weights.keys() == base.keys()
    scale = config["lora_alpha"] / config["r"]
    for name, weight in base.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in adapter:
            delta = scale * adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
            torch.testing.assert_close(merged_weights[name], weight + delta, rtol=1e-5, atol=1e-6, msg=name)
        elif f"base_model.model.{name}" in adapter:
            assert name in ("lm_head.weight", "model.embed_tokens.weight")
            assert torch.equal(merged_weights[name], adapter[f"base_model.model.{name}"])
        else:
            assert torch.equal(merged_weights[name], weight), name

    # The adapter reloads on its base and evaluates as at the end of training, also from a copy of the folder made
    # elsewhere, found the way scripts/evaluate_model.py finds it (adapter_base: the path relative to the adapter).
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    assert_same_eval(evaluate_saved(reloaded), metrics)
    moved = out.parent / "lora_moved"
    shutil.copytree(out, moved, dirs_exist_ok=True)
    assert adapter_base(str(moved)) == str((moved / "base").resolve())
    assert_same_eval(
        evaluate_saved(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_base(str(moved))), moved)), metrics
    )
    # Merging computes W + (alpha / r)·B·A once, in another order than the adapter's forward pass: float noise.
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert_same_eval(evaluate_saved(merged), metrics, loss_rtol=1e-4)


def test_lora_ddp_learns_and_leaves_the_base_untouched(lora_ddp, odd_data):
    out, proc = lora_ddp
    metrics = read_metrics(out)
    assert metrics["num_devices"] == 2 and metrics["eval_accuracy"] >= 0.8, metrics["eval_accuracy"]
    assert proc.stdout.count("trainable params:") == 1  # printed by the main process only
    # The last checkpoint holds the whole model after all 170 steps: its base weights equal the saved base and
    # the preset's initial weights bit for bit (DDP all-reduced the adapter's gradients only).
    trained = base_weights_of(load_file(out / f"checkpoint-{2 * steps_per_epoch()}/model.safetensors"))
    base = load_file(out / "base/model.safetensors")
    initial = initial_weights(odd_data)
    assert trained.keys() == base.keys() == initial.keys()
    for name in base:
        assert torch.equal(trained[name], base[name]) and torch.equal(base[name], initial[name]), name
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it was trained


def test_accelerate_loop_logs_through_the_tensorboard_tracker(lora_ddp):
    """--report_to tensorboard (the default): accelerate's tracker gets every log row under the Trainer's tags, from
    the main process alone (one run, one events file), and the run's flags as hyperparameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = lora_ddp
    (run,) = out.glob("runs/*/")
    (events,) = run.glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events))
    scalars.Reload()
    metrics = read_metrics(out)
    assert {s.step: s.value for s in scalars.Scalars("train/loss")} == pytest.approx(train_losses(metrics), rel=1e-6)
    evals = {row["step"]: row["eval_accuracy"] for row in metrics["log_history"] if "eval_accuracy" in row}
    assert {s.step: s.value for s in scalars.Scalars("eval/accuracy")} == pytest.approx(evals, rel=1e-6)
    assert "lora_r: 16" in next(run.glob("*/hparams.yml")).read_text()
