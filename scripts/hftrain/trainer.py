"""The Trainer setup that every Trainer example shares, so each script shows only its technique.

Every Trainer script calls `parse_args` (DEFAULTS, the command line parsed once, every check, the run lock), `load_data`,
`build_trainer` and `write_run_summary` (metrics.json, the model card, the Hub upload), and keeps what is particular to
it in view; `scripts/trainer/getting_started.py`, the lesson, spells out the Trainer that `build_trainer` builds, and
tests/test_one_setup.py keeps the two alike. sft.py, with TRL's argument classes, takes DEFAULTS, `start_run` and
`finish_run`.
"""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hftrain.checkpoints import check_same_model, resolve_checkpoint
from hftrain.cli import check_batch_size, check_output_dir, check_training_args, parse_command_line
from hftrain.data import PadCollator, Prepared, load_prepared
from hftrain.errors import UserError
from hftrain.extras import check_training_extras
from hftrain.metrics import Accuracy
from hftrain.models import PRESETS, check_max_length
from hftrain.preemption import PreemptionCallback
from hftrain.reporting import ThroughputCallback, write_results
from hftrain.sharding import check_deepspeed_config
from hftrain.streaming import check_streaming_args, load_streamed, stream_callbacks, stream_training_args

# The project's TrainingArguments defaults for the rating task; a script overrides what it teaches.
DEFAULTS: dict[str, Any] = dict(
    num_train_epochs=3,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=3e-3,
    warmup_steps=30,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    logging_steps=10,
    bf16=torch.cuda.is_available(),  # float32 on CPU, bf16 mixed precision on CUDA
    dataloader_pin_memory=torch.cuda.is_available(),
    report_to=["tensorboard"],
)


def parse_args(
    script_args: type,
    check: Callable[[Any, TrainingArguments], None] | None = None,
    resumable: bool = True,
    adapter: bool = False,
    **defaults: Any,
) -> tuple[Any, TrainingArguments, str | None]:
    """Parse (script_args, TrainingArguments) once, over DEFAULTS and the script's own `defaults` (the learning rate, and
    modules_to_save for an `adapter`, chosen by what --model is: `hftrain.cli.parse_command_line`), then `start_run`;
    returns (args, training_args, checkpoint). A script that cannot resume passes `resumable=False`: the flag is then
    refused, not ignored."""
    parser = HfArgumentParser((script_args, TrainingArguments))
    parser.set_defaults(**{**DEFAULTS, **defaults})
    args, training_args = parse_command_line(parser, adapter, check=check_training_flags)
    checkpoint = start_run(args.model, args, training_args, check, resumable)
    return args, training_args, checkpoint


def check_training_flags(namespace: Any) -> None:
    """What TrainingArguments' flags need, checked on the parsed values before it is built (it imports DeepSpeed)."""
    check_training_extras(namespace)  # deepspeed, liger-kernel, bitsandbytes, galore-torch: installed if asked for
    check_deepspeed_config(namespace.deepspeed)


def start_run(
    model: str,
    args: Any,
    training_args: TrainingArguments,
    check: Callable[[Any, TrainingArguments], None] | None = None,
    resumable: bool = True,
    streams: bool = True,
    inputs: Any = None,
) -> str | None:
    """Every Trainer script's checks of its parsed arguments, all before anything is loaded or written: sizes no run
    can use, --push_to_hub of a preset, --streaming's (`streams`: the script's arguments have them), the script's own
    `check(args, training_args)`; then resolve --resume_from_checkpoint, check the output directory against the run's
    `inputs` (by default `args`: --model, --data_dir, --dataset) and take its run lock. Returns the checkpoint to resume from, also left in training_args.resume_from_checkpoint."""
    if training_args.push_to_hub and model in PRESETS:
        raise UserError(
            f"--push_to_hub shares a fine-tuned model, but --model {model} is a preset with random weights; "
            "train a pretrained checkpoint (--model <Hub id or folder>) to share, or drop --push_to_hub"
        )
    if not resumable and training_args.resume_from_checkpoint:
        raise UserError(
            f"{Path(sys.argv[0]).name} does not resume from a checkpoint; run it again without --resume_from_checkpoint"
        )
    training_args.include_num_input_tokens_seen = "non_padding"  # tokens/s counts real tokens, not padding
    check_training_args(training_args)  # e.g. a batch size or step count of 0, more processes than GPUs
    if streams:
        check_streaming_args(args, training_args.max_steps, training_args.dataloader_num_workers)
    if check is not None:
        check(args, training_args)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if streams and args.streaming:
        stream_training_args(training_args)  # each process reads its part of every batch; no replay on resume
    check_output_dir(
        training_args.output_dir,
        args.overwrite_output_dir,
        checkpoint is not None,
        training_args.process_index == 0,
        inputs or args,
    )
    if checkpoint and training_args.process_index == 0:
        print(f"resuming from {checkpoint}")
    training_args.resume_from_checkpoint = checkpoint  # the folder resolved: `load_data` and `check_trainer` read it
    return checkpoint


def load_data(training_args: TrainingArguments, args: Any) -> Prepared:
    """args.data_dir, or args.dataset prepared for args.model first (see `load_prepared`), or with --streaming read as
    training goes (see `load_streamed`); the script seeds next."""
    if args.streaming:
        per_step = training_args.train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
        data = load_streamed(args, per_step, training_args.seed, training_args.resume_from_checkpoint)
        data.model = args.model
        return data
    with training_args.main_process_first():  # each machine's main process prepares the data; the others then load it
        data = load_prepared(args.data_dir, args.dataset, args.model, args.trust_remote_code)
    data.model = args.model
    return data


def build_trainer(
    model: Any, training_args: TrainingArguments, data: Prepared, trainer_class: type = Trainer, **kwargs: Any
) -> Trainer:
    """The Trainer that scripts/trainer/getting_started.py spells out (tests/test_one_setup.py keeps the two alike): the
    prepared data, the accuracy metric, the run's callbacks; `kwargs` add to or replace its arguments."""
    accuracy = Accuracy(data.answer_token_ids)
    arguments = {
        "data_collator": PadCollator(data.tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        "processing_class": data.tokenizer,
        "compute_metrics": accuracy.compute_metrics,
        "preprocess_logits_for_metrics": accuracy.preprocess_logits_for_metrics,
        **kwargs,
        "callbacks": [*kwargs.get("callbacks", []), *run_callbacks(data)],
    }
    trainer = trainer_class(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.test, **arguments)
    check_trainer(trainer, data)
    return trainer


def run_callbacks(data: Prepared) -> list[Any]:
    """Every Trainer run's callbacks: tokens/s and peak memory (ThroughputCallback), a checkpoint on SIGTERM or Ctrl-C
    before exiting, and with --streaming the stream's position saved in each checkpoint."""
    return [ThroughputCallback(seq_len=data.max_length), PreemptionCallback(), *stream_callbacks(data)]


def check_trainer(trainer: Trainer, data: Prepared) -> None:
    """Before training: the data's longest example fits the model's positions, a checkpoint to resume was saved from
    this --model (one sentence, not a size mismatch), and a batch is no larger than the data."""
    check_max_length(trainer.model, data.max_length)
    check_same_model(trainer.args.resume_from_checkpoint, trainer.model)
    if hasattr(data.train, "__len__"):  # a stream has no length
        check_batch_size(trainer.args.per_device_train_batch_size, trainer.args.world_size, len(data.train))


def throughput_metrics(trainer: Trainer) -> dict[str, Any]:
    """tokens/s, samples/s and peak memory measured by the ThroughputCallback that `build_trainer` registered."""
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ThroughputCallback))
    return callback.metrics


def write_run_summary(
    trainer: Trainer, data: Prepared, train_result: Any, eval_metrics: dict[str, float], **extra: Any
) -> dict[str, Any] | None:
    """`finish_run` with `run_metrics` and the script's `extra` metrics."""
    return finish_run(trainer, {**run_metrics(trainer, data, train_result, eval_metrics), **extra})


def run_metrics(trainer: Trainer, data: Prepared, train_result: Any, eval_metrics: dict[str, float]) -> dict[str, Any]:
    """The rating task's metrics of a run, with `data`'s model, source and task (for the model card)."""
    return {
        "eval_accuracy": eval_metrics["eval_accuracy"],
        "eval_loss": eval_metrics["eval_loss"],
        "train_loss": train_result.training_loss,
        "steps": trainer.state.global_step,
        "distributed_type": str(trainer.accelerator.distributed_type.value),  # MULTI_GPU (DDP), MULTI_CPU, or NO
        "base_model": data.model,
        "dataset": data.source,
        "task": data.task,
    }


def finish_run(trainer: Trainer, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Write metrics.json (with the throughput), the PNG, the model card and the summary line from the main process, and
    with --push_to_hub upload the folder; then every process waits for the others and all leave the process group
    together (a gloo process that exits without leaving it, or leaves it while a peer is still inside, can abort at exit
    and stall the launcher)."""
    result = None
    if trainer.is_world_process_zero():
        result = write_results(trainer.args.output_dir, {**metrics, **throughput_metrics(trainer)}, trainer.state.log_history)
        if trainer.args.push_to_hub:  # the folder as it is, with the card written above (the repository was created at start)
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=trainer.hub_model_id,
                folder_path=trainer.args.output_dir,
                commit_message="End of training",
                ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**"],
                token=trainer.args.hub_token,
            )
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return result
