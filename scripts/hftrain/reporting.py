"""Throughput, MFU and peak memory, and the files every run leaves: metrics.json, a PNG and the model card
(`hftrain.model_card`).

`ThroughputMeter` serves custom loops; `ThroughputCallback` wraps it for the Trainer.
MFU follows nanoGPT's `estimate_mfu`: 6N + 12·L·d·T FLOPs per token (N parameters that do
matmuls, L layers, d = heads x head size, T the sequence length) against the GPU's peak.
"""

import json
import math
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hftrain.gpus import gpu_by_device_name
from hftrain.models import count_parameters, full_numel


def peak_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s (hftrain.gpus, vendor datasheets), None for an unknown device."""
    gpu = gpu_by_device_name(device_name)
    return gpu.bf16_tflops * 1e12 if gpu else None


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def package_versions(*names: str) -> dict[str, str]:
    """Python's and each named package's installed version ("not installed" if absent): what every results
    file records beside its numbers."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def flops_per_token(model: Any, seq_len: int) -> float:
    """6N + 12·L·d·T. N leaves out the input embedding (a lookup) unless it is tied to the output layer."""
    config = model.config
    n = count_parameters(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and not getattr(config, "tie_word_embeddings", False):
        n -= full_numel(embed.weight)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6 * n + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a clock read next measures it (CUDA runs asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process (largest over its GPUs); on CPU, the peak resident set."""
    if torch.cuda.is_available():
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def peak_reserved_gib() -> float:
    """Peak GPU memory the caching allocator held (largest over this process's GPUs): what fragmentation costs on top."""
    return max(torch.cuda.max_memory_reserved(d) for d in range(torch.cuda.device_count())) / 2**30


class ThroughputMeter:
    """Counts real (non-padding) tokens and wall time between `start()` and `stop()`, less the time spent
    in evaluation (`with meter.paused():`), so tokens/s is the training's own."""

    def __init__(self, flops_per_token: float | None = None, num_devices: int = 1) -> None:
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.tokens = 0
        self.t0 = 0.0
        self.elapsed = 0.0
        self.excluded = 0.0  # seconds between start() and stop() that were not training (evaluation)

    def start(self, reset_peak: bool = True) -> None:
        synchronize()
        if reset_peak:
            reset_peak_memory()
        self.excluded = 0.0
        self.t0 = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def add_tokens(self, n: int) -> None:
        self.tokens += int(n)

    def stop(self) -> dict[str, Any]:
        synchronize()
        self.elapsed = time.perf_counter() - self.t0 - self.excluded
        tps = self.tokens / self.elapsed if self.elapsed > 0 else 0.0
        per_device = tps / self.num_devices
        peak = peak_flops(device_name())
        mfu = per_device * self.flops_per_token / peak if peak and self.flops_per_token else None
        return {
            "train_runtime_s": round(self.elapsed, 3),
            "train_tokens": self.tokens,
            "train_tokens_per_second": round(tps, 1),
            "train_tokens_per_second_per_device": round(per_device, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_memory_gib": round(peak_memory_gib(), 3),
            "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "cpu_max_rss",
            **({"peak_reserved_gib": round(peak_reserved_gib(), 3)} if torch.cuda.is_available() else {}),
            "num_devices": self.num_devices,
            "device": device_name(),
        }


def whole_run(state: Any, first_step: int) -> dict[str, Any]:
    """A run resumed at `first_step`: its train_loss and train_tokens over the whole run, not only the part since
    the resume (which is what the Trainer's training_loss and the clock cover). The checkpoint's log history holds the
    earlier part: each "loss" row is the mean over the steps since the row before; steps after the checkpoint's last
    such row were never logged and are left out (none when checkpoints fall on logging steps)."""
    before = [row for row in state.log_history if "loss" in row and row["step"] <= first_step]
    steps = [0] + [row["step"] for row in before]
    loss_sum = sum(row["loss"] * (step - prev) for row, prev, step in zip(before, steps, steps[1:]))
    resumed = next(row["train_loss"] for row in reversed(state.log_history) if "train_loss" in row)
    part = state.global_step - first_step
    return {
        "train_loss": (loss_sum + resumed * part) / max(steps[-1] + part, 1),
        "train_tokens": state.num_input_tokens_seen,  # restored from the checkpoint, then counted on
        "resumed_from_step": first_step,  # train_runtime_s and tokens/s: the part after it
    }


class ThroughputCallback(TrainerCallback):
    """For the Trainer: needs `include_num_input_tokens_seen="non_padding"` so padding is not counted.

    The examples measure the whole run. On CUDA each logged loss row also gets the peak memory since the row before
    (`peak_memory_gib`, `peak_reserved_gib`): with the row's `train_runtime` and `num_input_tokens_seen` (the
    Trainer's own), a benchmark reads any stretch of steps from an example's metrics.json, e.g. those after a warm-up.
    The cases a benchmark builds itself start the clock after `warmup_steps` (compilation, allocator, autotuning left
    out) and, with `measured_steps`, stop it that many steps later (the steps after are profiled, not measured); peak
    memory counts from the clock's start, or from the first step with `peak_memory_over_warmup` (a first optimizer
    step allocates the state, and the memory table counts it)."""

    def __init__(
        self, seq_len: int, warmup_steps: int = 0, measured_steps: int = 0, peak_memory_over_warmup: bool = False
    ) -> None:
        self.seq_len = seq_len
        self.warmup_steps, self.measured_steps = warmup_steps, measured_steps
        self.peak_memory_over_warmup = peak_memory_over_warmup
        self.meter = ThroughputMeter()
        self.metrics: dict[str, Any] = {}
        self.tokens_at_start = 0
        self.first_step = 0  # global_step when training (or resuming) began
        self.step_at_start = 0  # global_step when the clock started
        self.steps = 0  # steps the clock measured
        self.clock_running = False
        self.earlier_peaks = (0.0, 0.0)  # allocated, reserved (GiB) before the last logged row's reset

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # DDP runs one process per device; plain `python` on several GPUs runs DataParallel in one.
        self.meter.num_devices = args.world_size if args.world_size > 1 else max(1, args.n_gpu)
        self.meter.flops_per_token = flops_per_token(model, self.seq_len) if model is not None else None
        self.first_step = state.global_step  # non-zero when resuming
        if self.peak_memory_over_warmup:
            reset_peak_memory()  # loading (e.g. quantizing on load) has its own transient peak, not counted
        if not self.warmup_steps:
            self._start(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = state.global_step - self.first_step
        if self.warmup_steps and done == self.warmup_steps:
            self._start(state)
        elif self.measured_steps and done == self.warmup_steps + self.measured_steps:
            self._stop(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.clock_running and metrics:  # the evaluations between epochs are not training time
            self.meter.excluded += metrics.get("eval_runtime", 0.0)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not (torch.cuda.is_available() and logs and "loss" in logs and state.log_history):
            return
        interval = (peak_memory_gib(), peak_reserved_gib())
        state.log_history[-1].update(peak_memory_gib=round(interval[0], 3), peak_reserved_gib=round(interval[1], 3))
        self.earlier_peaks = (max(self.earlier_peaks[0], interval[0]), max(self.earlier_peaks[1], interval[1]))
        reset_peak_memory()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.metrics:
            self._stop(state)
        if self.first_step and not self.warmup_steps:
            self.metrics.update(whole_run(state, self.first_step))

    def _start(self, state: Any) -> None:
        self.tokens_at_start, self.step_at_start = state.num_input_tokens_seen, state.global_step
        self.meter.start(reset_peak=not self.peak_memory_over_warmup)
        if not self.peak_memory_over_warmup:
            self.earlier_peaks = (0.0, 0.0)
        self.clock_running = True

    def _stop(self, state: Any) -> None:
        self.meter.tokens = state.num_input_tokens_seen - self.tokens_at_start
        self.steps = state.global_step - self.step_at_start
        self.metrics = self.meter.stop()
        if torch.cuda.is_available():  # the logged rows' resets must not hide an earlier peak
            self.metrics["peak_memory_gib"] = max(self.metrics["peak_memory_gib"], round(self.earlier_peaks[0], 3))
            self.metrics["peak_reserved_gib"] = max(self.metrics["peak_reserved_gib"], round(self.earlier_peaks[1], 3))
        self.clock_running = False


class GenerationMeter:
    """An RL trainer's sampling, timed apart from its training: wraps the TRL trainer's one-turn generation (the call
    that turns a batch of prompts into completions) and counts the completion tokens it returns."""

    def __init__(self, trainer: Any) -> None:
        self.tokens, self.seconds = 0, 0.0
        generate = trainer._generate_single_turn

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            t0 = time.perf_counter()
            completion_ids, *rest = generate(*args, **kwargs)
            synchronize()
            self.seconds += time.perf_counter() - t0
            self.tokens += sum(len(ids) for ids in completion_ids)
            return (completion_ids, *rest)

        trainer._generate_single_turn = timed

    def metrics(self) -> dict[str, Any]:
        return {
            "generation_tokens": self.tokens,
            "generation_seconds": round(self.seconds, 3),
            "generation_tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
        }


def save_curves(log_history: list[dict[str, Any]], path: Path, task: str = "rating", curves: list[str] | None = None) -> None:
    """Training loss, eval loss and eval accuracy against the step, one PNG; `curves`: the logged values to draw in
    the right panel instead of the accuracy (a preference run's reward margins, an RL run's mean reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in log_history if key in r and r[key] is not None and math.isfinite(r[key])]
        return [r["step"] for r in rows], [r[key] for r in rows]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(*series("loss"), label="train loss")
    ax_loss.plot(*series("eval_loss"), "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="loss", yscale="symlog" if curves else "log")  # DPO/GRPO losses reach 0 or below
    ax_loss.legend()
    if curves:
        for key in curves:
            ax_acc.plot(*series(key), ".-", label=key)
        ax_acc.set(xlabel="step", ylabel=" / ".join(sorted({c.removeprefix("eval_") for c in curves})))
        ax_acc.legend()
        fig.suptitle(path.parent.name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    ax_acc.plot(*series("eval_accuracy"), "o-", color="tab:green")
    ax_acc.set(xlabel="step", ylabel="eval accuracy" if task == "rating" else "eval next-token accuracy", ylim=(0, 1.02))
    if task == "rating":  # five answers: 20% by guessing; text has no such line
        ax_acc.axhline(0.2, ls=":", color="grey", label="chance (rating task)")
        ax_acc.legend()
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def perplexity(loss: float) -> float:
    """exp of the mean loss per token (nats), capped where exp overflows."""
    return math.exp(min(loss, 700.0))


def language_model_metrics(metrics: dict[str, Any], log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """perplexity after training (exp of the loss per target token), and eval loss, perplexity and accuracy before it
    (an evaluation at step 0, from --eval_on_start); each eval row of the history gets its eval_perplexity too."""
    evals = [row for row in log_history if "eval_loss" in row]
    for row in evals:  # the loops' eval_loss is per target token; the Trainer's rows have it from Accuracy already
        row.setdefault("eval_perplexity", perplexity(row["eval_loss"]))
    if not evals and "eval_loss" not in metrics:  # an RL run: no held-out loss
        return {}
    out = {"perplexity": evals[-1]["eval_perplexity"] if evals else perplexity(metrics["eval_loss"])}
    first = evals[0] if evals else None
    if first is not None and first.get("step") == 0:
        out.update(eval_loss_before=first["eval_loss"], perplexity_before=first["eval_perplexity"])
        if "eval_accuracy" in first:
            out["eval_accuracy_before"] = first["eval_accuracy"]
    return out


def write_results(
    output_dir: str, metrics: dict[str, Any], log_history: list[dict[str, Any]], curves: list[str] | None = None
) -> dict[str, Any]:
    """Write metrics.json, training_curves.png and the model card (README.md), print the one-line summary, return the
    metrics. `metrics` may name the run's base_model, dataset, task (rating or text) and method, for the card and the
    plot; `curves` go to the plot's right panel (`save_curves`)."""
    from hftrain.model_card import write_model_card
    from hftrain.sharing import shareable_base

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "method" not in metrics:  # a TRL preference or RL loss is no loss per token: no perplexity from it
        metrics = {**metrics, **language_model_metrics(metrics, log_history)}
    if "base_model" in metrics:
        metrics["base_model"] = shareable_base(metrics["base_model"], output_dir)
    metrics["log_history"] = log_history
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_curves(log_history, out / "training_curves.png", metrics.get("task", "rating"), curves)
    write_model_card(output_dir, metrics)
    before = f" (before {metrics['perplexity_before']:,.2f})" if "perplexity_before" in metrics else ""
    parts = [f"done: {metrics.get('steps', '?')} steps", f"{metrics['train_tokens_per_second']:,.0f} tokens/s"]
    parts.append(f"peak memory {metrics['peak_memory_gib']:.2f} GiB")
    if metrics.get("eval_accuracy") is not None:
        acc_before = metrics.get("eval_accuracy_before")
        parts.append(
            f"eval accuracy {metrics['eval_accuracy']:.3f}" + (f" (before {acc_before:.3f})" if acc_before is not None else "")
        )
    if "perplexity" in metrics:
        parts += [f"eval loss {metrics['eval_loss']:.4f}", f"perplexity {metrics['perplexity']:,.2f}{before}"]
    print(" | ".join([*parts, str(out)]))
    return metrics
