"""Argument and output-folder checks shared by every script, run before any model is loaded."""

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hftrain.data import DEFAULT_DATA_DIR
from hftrain.errors import UserError
from hftrain.full_disk import report_full_disk
from hftrain.launch import check_launch
from hftrain.run_lock import RunLock
from hftrain.streaming import StreamingArguments, check_streaming_args


@dataclass
class ScriptArguments(StreamingArguments):
    """The flags every example takes beside its technique's: the model, the data (or --streaming), and the output
    folder's safety."""

    data_dir: str = field(
        default=DEFAULT_DATA_DIR,
        metadata={"help": "Data made by scripts/prepare_datasets.py (the default is made on first use)."},
    )
    model: str = field(default="tiny", metadata={"help": "A preset (tiny, small, 1b), a local checkpoint directory or a Hub id."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A text file, .json/.jsonl/.csv/.parquet file, saved dataset or Hub dataset to prepare for --model (its "
            "tokenizer if a checkpoint; text in blocks) into data/<name>[-<model>] and train on; other options: "
            "scripts/prepare_datasets.py."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a run already in --output_dir."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with a Hub model. Off: only enable for code you trust."}
    )


RUN_MARKERS = ("metrics.json", "config.json", "adapter_config.json", "model.safetensors")
# checkpoint-<step> folders, and the loops' checkpoint-<step>.tmp ones that a save cut short left behind.
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+(\.tmp)?")
# Files the Trainer, accelerate or DeepSpeed write into a checkpoint: a checkpoint-<step> folder holding none of them
# (and not empty) is not one a run wrote, and stays.
CHECKPOINT_FILES = (
    "trainer_state.json",
    "loop_state.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "training_args.bin",
    "rng_state.pth",
    "random_states_0.pkl",
    "latest",
    "config.json",
)


def run_checkpoints(output_dir: str) -> list[Path]:
    """The checkpoint folders that runs wrote in `output_dir`; a folder of that name that no run wrote is refused."""
    found = []
    for path in sorted(Path(output_dir).iterdir()) if Path(output_dir).is_dir() else []:
        if not CHECKPOINT_NAME.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
            continue  # a user's checkpoint-best-model folder, a checkpoint-notes.txt file
        if any(path.iterdir()) and not any((path / name).exists() for name in CHECKPOINT_FILES):
            raise UserError(
                f"{path} was not written by a training run (it holds none of a checkpoint's files), so it is left alone; "
                "move it out of --output_dir, or choose another --output_dir"
            )
        found.append(path)
    return found


def holds_run(output_dir: str) -> bool:
    out = Path(output_dir)
    return out.is_dir() and (any((out / m).exists() for m in RUN_MARKERS) or bool(run_checkpoints(output_dir)))


def check_not_an_input(output_dir: str, model: str | None, data_dir: str | None, dataset: str | None) -> None:
    """The output folder is never an input of the run, inside one or holding one: a run writes its model and
    checkpoints there, and `prepare_datasets.py --force` replaces a prepared data folder with whatever it holds."""
    from hftrain.data import data_folder
    from hftrain.models import is_local_path

    out = Path(output_dir).expanduser().resolve()
    inputs = []
    if model is not None and is_local_path(model) and Path(model).expanduser().is_dir():
        inputs.append(("--model", model, Path(model).expanduser().resolve()))
    if data_dir is not None:
        data = data_folder(data_dir, dataset, model)
        inputs.append(("the prepared data folder" if dataset else "--data_dir", data, Path(data).resolve()))
    # A prepared data folder above the output, whichever data this run reads.
    inputs += [
        ("the prepared data folder", str(p), p)
        for p in [out, *out.parents]
        if (p / "info.json").is_file() and (p / "dataset").is_dir()
    ]
    for flag, given, folder in inputs:
        if out == folder:
            raise UserError(
                f"--output_dir {output_dir} is {flag} {given} itself, which the run would write over; choose another "
                f"--output_dir (e.g. output/{folder.name}-finetuned)"
            )
        if folder.is_relative_to(out):
            raise UserError(f"--output_dir {output_dir} holds {flag} {given}; choose an --output_dir outside it")
        if out.is_relative_to(folder):
            raise UserError(f"--output_dir {output_dir} is inside {flag} {given}; choose an --output_dir outside it")


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool, is_main_process: bool = True, inputs: Any = None) -> None:
    """Refuse an output folder that is, holds or sits inside an input of the run (`inputs`: the script's arguments, their
    --model, --data_dir and --dataset), take its run lock (main process; one run per folder, released at exit), turn a
    full disk into one sentence, and refuse to write into another run's folder unless asked; with --overwrite_output_dir
    drop the checkpoints runs wrote there."""
    model = getattr(inputs, "model", None) or getattr(inputs, "model_name_or_path", None)
    check_not_an_input(output_dir, model, getattr(inputs, "data_dir", None), getattr(inputs, "dataset", None))
    RunLock(output_dir, is_main_process).acquire()
    report_full_disk(output_dir, is_main_process)
    if resuming:
        if is_main_process:  # saves that a kill cut short: a save of the same step would otherwise write into them
            for partial in run_checkpoints(output_dir):
                if partial.name.endswith(".tmp") or not any(
                    (partial / n).exists() for n in ("trainer_state.json", "loop_state.json")
                ):
                    shutil.rmtree(partial)
        return
    if not holds_run(output_dir):
        return
    if not overwrite:
        raise UserError(
            f"{output_dir} already holds a training run; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint to continue it, or choose another --output_dir"
        )
    if is_main_process:  # old checkpoints would otherwise be mistaken for this run's on resume
        for ckpt in run_checkpoints(output_dir):
            shutil.rmtree(ckpt)


def check_training_args(training_args: Any) -> None:
    """Sizes TrainingArguments accepts but no run can use, and a launch whose processes cannot all take part,
    refused before anything is loaded."""
    check_launch(training_args.world_size, training_args.device)
    _check_sizes(training_args, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"))


def check_loop_args(args: Any) -> None:
    """The custom loops' arguments, checked as the Trainer's are (and the fields only a loop has), before any work."""
    _check_sizes(
        args, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps")
    )
    for name in ("warmup_steps", "checkpointing_steps", "save_total_limit"):
        if getattr(args, name, 0) < 0:
            raise UserError(f"--{name} is {getattr(args, name)}; it must be 0 or more")
    if args.max_grad_norm <= 0:
        raise UserError(f"--max_grad_norm is {args.max_grad_norm}; it must be above 0")
    check_report_to(getattr(args, "report_to", "none"))
    check_streaming_args(args, args.max_steps)


def check_report_to(report_to: str) -> None:
    """--report_to of an accelerate loop: trackers accelerate finds installed (it would skip others silently)."""
    from accelerate.tracking import get_available_trackers

    if report_to == "none":
        return
    available = [str(t) for t in get_available_trackers()]
    for name in report_to.split(","):
        if name not in ("all", *available):
            raise UserError(
                f"--report_to {name}: accelerate has no such tracker installed here (installed: {', '.join(available) or 'none'}); "
                f"install its package (e.g. pip install {name}), or pass tensorboard, all or none"
            )


def _check_sizes(args: Any, at_least_one: tuple[str, ...]) -> None:
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} is {getattr(args, name)}; it must be at least 1")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate is {args.learning_rate}; it must be above 0 (e.g. 3e-3 for tiny, 5e-4 for small)")
    if args.max_steps < -1:
        raise UserError(f"--max_steps is {args.max_steps}; pass a number of steps above 0, or -1 to train for --num_train_epochs")
    if args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs <= 0):
        raise UserError("nothing to train: --max_steps is 0 or --num_train_epochs is not above 0; set one of them above 0")


class ByModel:
    """A parser default that --model may replace (`parse_command_line`); --help shows the preset's value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return f"{self.value} for a preset; a checkpoint's own, printed at start"


# The parser's fields whose defaults depend on what --model is (`hftrain.models.model_defaults`).
MODEL_DEPENDENT = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "modules_to_save")


def parse_command_line(
    parser: Any,
    adapter: bool = False,
    check: Callable[[Any], None] | None = None,
    defaults: Callable[[Any], dict[str, Any]] | None = None,
    names: tuple[str, ...] = MODEL_DEPENDENT,
    argv: list[str] | None = None,
) -> tuple[Any, ...]:
    """Parse the command line (`argv`, by default sys.argv) once into the parser's dataclasses. The defaults that depend
    on what --model is fill the `names` no flag gave, however spelled: `hftrain.models.model_defaults` (learning_rate, a
    checkpoint's batch sizes, modules_to_save for an `adapter`), or `defaults(namespace)` for a script with its own rule;
    the start line names those the run takes. `check(namespace)` runs on the parsed values before the dataclasses are
    built (TrainingArguments imports DeepSpeed when built). A --model in a format this project does not load is refused
    here, before anything is written."""
    from hftrain.models import check_model, describe_defaults, model_defaults

    names = tuple(name for name in names if name in {action.dest for action in parser._actions})
    preset = {name: parser.get_default(name) for name in names}
    parser.set_defaults(**{name: ByModel(value) for name, value in preset.items()})  # what no flag sets stays a ByModel
    try:
        namespace, unused = parser.parse_known_args(argv)
    finally:
        parser.set_defaults(**preset)
    if unused:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {unused}")
    if check is not None:
        check(namespace)
    model = getattr(namespace, "model", None) or namespace.model_name_or_path
    check_model(model, bool(getattr(namespace, "trust_remote_code", False)))
    if defaults is not None:
        by_model = defaults(namespace)
    else:
        by_model = model_defaults(model, adapter, preset.get("learning_rate", 0.0), row_tokens(namespace))
    applied = {}
    for name in names:
        if not isinstance(getattr(namespace, name), ByModel):
            continue  # a flag gave it
        key = name.removeprefix("lora_")  # TRL's ModelConfig spells it --lora_modules_to_save, a list
        value = by_model.get(key, preset[name])
        if key in by_model:
            applied[key] = value
            value = (value.split(",") if value else None) if name != key else value
        setattr(namespace, name, value)
    if applied and os.environ.get("RANK", "0") == "0":
        print(describe_defaults(model, applied), flush=True)
    return parser.parse_dict(vars(namespace))


def row_tokens(args: Any) -> int:
    """The longest row the run trains on, which a checkpoint's batch sizes follow: an already prepared --data_dir's, else
    a corpus's longest block (what --dataset prepares: hftrain.corpus.DEFAULT_BLOCK_SIZE)."""
    if getattr(args, "dataset", None) is None and getattr(args, "data_dir", None):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # unreadable: load_prepared says why, later
            return int(json.loads(Path(args.data_dir, "info.json").read_text())["max_length"])
    return 1024


def check_batch_size(per_device_batch_size: int, num_processes: int, num_train: int) -> None:
    """A batch larger than the data would make every epoch one short batch (per process, under DDP)."""
    per_process = num_train // num_processes
    if per_device_batch_size > per_process:
        each = f" each of the {num_processes} processes gets" if num_processes > 1 else ""
        raise UserError(
            f"--per_device_train_batch_size {per_device_batch_size} is larger than the {per_process} training examples{each}; "
            f"use at most {per_process}, or prepare more data"
        )
