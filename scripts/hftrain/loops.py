"""Plumbing shared by the custom training loops (scripts/basic/, scripts/lora/); the loops stay in the scripts.

- `accumulation_groups`: the micro-batches of one optimizer step, fetched together, so that the
  loss can be divided by the target tokens of the whole accumulated batch before the first backward.
- `num_targets`: those target tokens (labels after the one-token shift, padding excluded);
  `num_tokens`: the real input tokens, for tokens/s.
- `evaluate`: eval loss per target token and accuracy, every test example counted exactly once,
  also across processes (pass `gather=accelerator.gather_for_metrics`).
- `LogHistory`: the Trainer-style log rows, each also sent to a tracker: accelerate's (`accelerator.log`), or for a
  loop without an Accelerator accelerate's TensorBoard tracker alone (`tensorboard`).
- `save_loop_state` / `load_loop_state`: the scheduler's state and the log rows as JSON in each checkpoint
  (loop_state.json), beside what `accelerator.save_state` writes. Not `register_for_checkpointing`: accelerate
  would pickle them and load them back with `torch.load(weights_only=False)`, which runs whatever code a
  planted file holds.
- `publish_checkpoint`: checkpoints are written under a temporary name and renamed once complete, so a
  crash mid-save leaves the earlier ones usable; then only the newest few are kept.
"""

import contextlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.tracking import TensorBoardTracker
from tqdm.auto import tqdm

from hftrain.cli import ScriptArguments
from hftrain.metrics import Accuracy


@dataclass
class LoopTrainingArguments(ScriptArguments):
    """The hand-written loops' training flags, named and defaulted as transformers' TrainingArguments names them, beside
    ScriptArguments' --model, --data_dir, --dataset, --overwrite_output_dir and --trust_remote_code."""

    num_train_epochs: int = field(default=3, metadata={"help": "Passes over the training data."})
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps to take; when positive it overrides --num_train_epochs."}
    )
    per_device_train_batch_size: int = field(
        default=32,
        metadata={
            "help": "Examples per micro-batch (default by --model: 32 for a preset, a checkpoint as many as fill 1024 tokens)."
        },
    )
    per_device_eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "Examples per evaluation batch (default by --model: 64 for a preset, a checkpoint as many as fill 2048 tokens)."
        },
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step: a step sees this many times the batch size."}
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate of AdamW (3e-3 suits tiny, 5e-4 small)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "A transformers schedule: linear, cosine, constant, ..."})
    warmup_steps: int = field(default=30, metadata={"help": "Steps over which the learning rate rises from 0 to its peak."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient to this global L2 norm."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many optimizer steps."})
    seed: int = field(default=42, metadata={"help": "Seeds the preset's random weights and the shuffling."})
    eval_on_start: bool = field(
        default=False, metadata={"help": "Evaluate before the first step too, so the run shows what training changed."}
    )


Batch = dict[str, torch.Tensor]


def accumulation_groups(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Lists of `size` consecutive micro-batches; the last group of an epoch may be shorter."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, size)):
        yield group


def num_targets(batches: list[Batch]) -> torch.Tensor:
    """Tokens that carry a loss: logits at t predict token t + 1, so the first token of each row has none."""
    return torch.stack([(b["labels"][:, 1:] != -100).sum() for b in batches]).sum()


def num_tokens(batches: list[Batch]) -> int:
    """Real (non-padding) input tokens, for tokens/s; one host sync for the whole group."""
    return int(torch.stack([b["attention_mask"].sum() for b in batches]).sum())


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per target token (float32), 0 at padding; shape (batch, length - 1)."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )  # (B, V, T-1) against (B, T-1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    accuracy: Accuracy,
    device: torch.device | str | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    show_progress: bool = True,
) -> dict[str, float]:
    """eval_loss (loss summed over the target tokens / their number), eval_accuracy, eval_samples.

    Everything is reduced to one row per example before `gather`, so that with
    `accelerator.gather_for_metrics` the padded rows that make the last batch even across
    processes are dropped by position: each example counts once, whatever the world size.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, target tokens, right answers, scored answers
    samples = 0
    for batch in tqdm(loader, desc="eval", leave=False, disable=not show_progress):
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        correct = accuracy.correct(logits.float(), labels)  # 1 right, 0 wrong, -1 not scored
        per_example = torch.stack(
            [
                token_losses(logits, labels).sum(-1),
                (labels[:, 1:] != -100).sum(-1).float(),
                (correct == 1).sum(-1).float(),
                (correct >= 0).sum(-1).float(),
            ],
            dim=-1,
        )
        per_example = gather(per_example)
        totals += per_example.sum(0).double().cpu()
        samples += per_example.shape[0]
    model.train(was_training)
    loss_sum, tokens, right, scored = totals.tolist()
    return {
        "eval_loss": loss_sum / max(tokens, 1.0),
        "eval_accuracy": right / scored if scored else 0.0,
        "eval_samples": samples,
    }


def run_name() -> str:
    """Where a run's TensorBoard events go inside the output directory: runs/<date>, as the Trainer's."""
    return os.path.join("runs", datetime.now().strftime("%b%d_%H-%M-%S"))


def tensorboard(output_dir: str) -> Callable[..., None]:
    """For a loop without an Accelerator: the `log` of accelerate's TensorBoard tracker (the one
    `Accelerator(log_with="tensorboard")` starts), writing to output_dir/runs/<date>."""
    tracker = TensorBoardTracker(run_name(), output_dir)
    tracker.start()
    return tracker.log


class LogHistory:
    """Rows like the Trainer's `state.log_history` (metrics.json and loop_state.json keep them), each also handed to
    a tracker's `log(values, step=)` (`accelerator.log`, or `tensorboard(output_dir)`) under the Trainer's tags."""

    def __init__(self, tracker: Callable[..., None] | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.tracker = tracker

    def log(self, step: int, **values: float) -> dict[str, Any]:
        row = {"step": step, **values}
        self.rows.append(row)
        if self.tracker is not None:  # the Trainer's tag names: train/loss, eval/loss, eval/accuracy
            self.tracker({f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}": v for k, v in values.items()}, step=step)
        return row

    def latest(self) -> dict[str, Any]:
        """The last value logged for each key (a resumed run's restored rows included)."""
        merged: dict[str, Any] = {}
        for row in self.rows:
            merged.update(row)
        return merged


LOOP_STATE = "loop_state.json"


def save_loop_state(checkpoint: str, scheduler: Any, history: LogHistory) -> None:
    """The learning-rate scheduler's state (numbers and lists) and the log rows, as JSON in the checkpoint folder."""
    state = {"scheduler": scheduler.state_dict(), "log_history": history.rows}
    Path(checkpoint, LOOP_STATE).write_text(json.dumps(state, indent=1) + "\n")


def load_loop_state(checkpoint: str, scheduler: Any, history: LogHistory) -> None:
    state = json.loads(Path(checkpoint, LOOP_STATE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    history.rows = list(state["log_history"])


# Not ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N): it writes checkpoints/checkpoint_<save count>
# in place after deleting the oldest (a crash leaves a half-written newest) and drops the step that `latest` resumes at.
def publish_checkpoint(written: str, path: str, keep: int) -> None:
    """Rename the completely written checkpoint folder `written` to `path` (replacing one of the same step from an
    earlier attempt), then keep only the newest `keep` checkpoints. A rename is atomic: `path` is never half written."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(written, path)
    prune_checkpoints(os.path.dirname(path), keep)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint-<step> folders (0 or less: keep all)."""
    if keep <= 0:
        return
    steps = {int(p.name.removeprefix("checkpoint-")): p for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit()}
    checkpoints = [steps[k] for k in sorted(steps)]
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
