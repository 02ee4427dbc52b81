"""Checks shared by every script, run before any model is loaded."""

import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from hftrain.errors import UserError

RUN_MARKERS = ("metrics.json", "config.json", "adapter_config.json", "model.safetensors")


def holds_run(output_dir: str) -> bool:
    out = Path(output_dir)
    return out.is_dir() and (any((out / m).exists() for m in RUN_MARKERS) or any(out.glob("checkpoint-*")))


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool, is_main_process: bool = True) -> None:
    """Refuse to write into another run's folder unless asked; with --overwrite_output_dir drop its checkpoints."""
    if resuming or not holds_run(output_dir):
        return
    if not overwrite:
        raise UserError(
            f"{output_dir} already holds a training run; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint to continue it, or choose another --output_dir"
        )
    if is_main_process:  # old checkpoints would otherwise be mistaken for this run's on resume
        for ckpt in Path(output_dir).glob("checkpoint-*"):
            shutil.rmtree(ckpt)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint latest` (or `true`) picks the newest checkpoint in the output directory."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint.lower() in ("latest", "last", "true"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise UserError(
                f"--resume_from_checkpoint {resume_from_checkpoint}: {output_dir} holds no checkpoint-* folder to resume from"
            )
        return last
    if not Path(resume_from_checkpoint).is_dir():
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} does not exist; pass a checkpoint-* folder or 'latest'"
        )
    return resume_from_checkpoint


def check_training_args(training_args: Any) -> None:
    """Sizes TrainingArguments accepts but no run can use, refused before anything is loaded."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise UserError(f"--{name} is {getattr(training_args, name)}; it must be at least 1")
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.num_train_epochs <= 0):
        raise UserError("nothing to train: --max_steps is 0 or --num_train_epochs is not above 0; set one of them above 0")
