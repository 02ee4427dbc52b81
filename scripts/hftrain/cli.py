"""Checks shared by every script, run before any model is loaded, and what the scripts that launch others share."""

import json
import os
import pickle
import re
import shutil
import socket
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hftrain.errors import UserError
from hftrain.safety import RunLock, report_full_disk

RUN_MARKERS = ("metrics.json", "config.json", "adapter_config.json", "model.safetensors")


def holds_run(output_dir: str) -> bool:
    out = Path(output_dir)
    return out.is_dir() and (any((out / m).exists() for m in RUN_MARKERS) or any(out.glob("checkpoint-*")))


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool, is_main_process: bool = True) -> None:
    """Take the output directory's run lock (main process; one run per folder, released at exit), turn a full disk
    into one sentence, and refuse to write into another run's folder unless asked; with --overwrite_output_dir drop
    its checkpoints."""
    RunLock(output_dir, is_main_process).acquire()
    report_full_disk(output_dir, is_main_process)
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


# What a resumable checkpoint holds. The Trainer writes trainer_state.json last (after the weights, optimizer,
# scheduler and RNG states), so a save cut short by a crash leaves a folder without it. The accelerate loops
# save into a temporary folder and rename it when complete; these are the files their load_state reads.
TRAINER_CHECKPOINT = ("trainer_state.json",)
ACCELERATE_CHECKPOINT = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "loop_state.json")
# Files that the resume paths read with torch.load(weights_only=True); a Trainer checkpoint's training_args.bin
# is a pickle too, but nothing reads it back.
NOT_LOADED = ("training_args.bin",)


def unpicklable_file(folder: Path) -> str | None:
    """A file in `folder` that only unpickling arbitrary objects could load, or None. The accelerate loops of earlier
    versions pickled their scheduler and history (custom_checkpoint_*.pkl, loaded by accelerate with
    weights_only=False); any other pickle must load with weights_only=True, as the resume paths load it. Memory-mapped,
    so only the pickled structure is read, whatever the size of the tensors."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name.startswith("custom_checkpoint_"):
            return path.name
        if path.suffix in (".bin", ".pt", ".pth", ".pkl") and path.name not in NOT_LOADED and zipfile.is_zipfile(path):
            try:
                with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):  # numpy's RNG state, as accelerate allows
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                return path.name
            except Exception:
                pass  # cut short or damaged: checkpoint_problem says so
    return None


def checkpoint_problem(folder: Path, required: tuple[str, ...] = TRAINER_CHECKPOINT) -> str | None:
    """Why `folder` cannot be resumed from (a file missing or cut short), or None. Reads the weights' headers, not
    their tensors, and the ends of the pickles: fast at any model size."""
    for name in required:
        if not (folder / name).is_file():
            return f"it has no {name}"
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if path.suffix == ".safetensors":  # the header must parse and the tensors it lists must fit the file
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in (".bin", ".pt", ".pth", ".pkl") and not zipfile.is_zipfile(path):
                return f"{path.name} is cut short"  # torch.save writes a zip archive, whose directory comes last
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:
            return f"{path.name} is cut short or damaged"
    return None


def resolve_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str, required: tuple[str, ...] = TRAINER_CHECKPOINT
) -> str | None:
    """`--resume_from_checkpoint latest` (or `true`) picks the newest complete checkpoint in the output directory,
    skipping, with one line each, those a crash left incomplete; a named checkpoint that is incomplete is refused."""
    if not resume_from_checkpoint:
        return None

    def refuse_unpickling(folder: Path) -> None:
        name = unpicklable_file(folder)
        if name is not None:
            raise UserError(
                f"--resume_from_checkpoint {resume_from_checkpoint}: {folder} holds {name}, which only unpickling "
                "arbitrary objects could load (it was written by an earlier version of this script, or by something else), "
                "so nothing was loaded; resume from a checkpoint this version wrote, or start again with --overwrite_output_dir"
            )

    if resume_from_checkpoint.lower() in ("latest", "last", "true"):
        found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
        if not found:
            raise UserError(
                f"--resume_from_checkpoint {resume_from_checkpoint}: {output_dir} holds no checkpoint-* folder to resume from"
            )
        for folder in sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
            refuse_unpickling(folder)
            problem = checkpoint_problem(folder, required)
            if problem is None:
                return str(folder)
            if os.environ.get("RANK", "0") == "0":  # once, not once per process
                print(f"skipping {folder}: {problem} (a save that was interrupted); trying the previous checkpoint", flush=True)
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: every checkpoint in {output_dir} is incomplete; "
            "start again without --resume_from_checkpoint (and with --overwrite_output_dir)"
        )
    if not Path(resume_from_checkpoint).is_dir():
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} does not exist; pass a checkpoint-* folder or 'latest'"
        )
    if Path(resume_from_checkpoint).resolve().parent != Path(output_dir).resolve():
        # Resuming writes into --output_dir: into another run's folder it would overwrite that run's model and
        # metrics and rotate its checkpoints away.
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is not inside --output_dir {output_dir}; a run continues "
            f"in its own folder: copy the checkpoint there first (mkdir -p {output_dir} && cp -r {resume_from_checkpoint} "
            f"{output_dir}/) and resume from the copy"
        )
    refuse_unpickling(Path(resume_from_checkpoint))
    problem = checkpoint_problem(Path(resume_from_checkpoint), required)
    if problem is not None:
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is incomplete or damaged ({problem}); "
            "pass an earlier checkpoint-* folder, or 'latest' for the newest complete one"
        )
    return resume_from_checkpoint


def free_port() -> int:
    """A TCP port nothing listens on now, for a rendezvous: runs side by side (or a lingering process) never share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_gpu_only(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a one-GPU case, seeing only the first visible GPU: a plain process that saw several would
    have the Trainer wrap the model in DataParallel over all of them."""
    return {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}


def worker_error(stderr: str, returncode: int) -> str:
    """A failed launch in one line, for a results table: the worker's own exception, not the launcher's
    ChildFailedError summary that follows it (without one, the last lines; without output, the exit status)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-^~")]
    errors = [ln for ln in lines if re.search(r"\w(Error|Exception)\b", ln) and "ChildFailedError" not in ln]
    return (errors[-1] if errors else " / ".join(lines[-3:]))[-600:] or f"exit status {returncode}"


def check_launch(num_processes: int, device: torch.device) -> None:
    """The processes a launcher started must all join one run: refuse more per machine than it has GPUs, and a
    multi-GPU launch on a machine without any (where each process would silently train alone)."""
    started = int(os.environ.get("WORLD_SIZE", "1"))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))  # torchrun; deepspeed
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0  # CPU processes (ACCELERATE_USE_CPU) need none
    if gpus and per_machine > gpus:  # accelerate would put two processes on one GPU, which NCCL refuses mid-run
        raise UserError(
            f"{per_machine} processes were launched on this machine but it has {gpus} GPU(s); "
            f"launch with --num_processes {gpus} (or set num_processes: {gpus} in the accelerate config)"
        )
    if started > num_processes:
        raise UserError(
            f"{started} processes were launched but only {num_processes} joined the run, as with a multi-GPU config on a "
            f"machine without GPUs; run one process with plain python, or {started} CPU processes with "
            f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {started}"
        )


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


def set_model_defaults(parser: Any, model: str, adapter: bool = False) -> dict[str, Any]:
    """Make the defaults that depend on what --model is (`hftrain.models.model_defaults`: learning_rate, and
    modules_to_save for an adapter) the parser's defaults, so a flag given on the command line still wins; print them
    once. `parser` already holds the script's own learning rate, the one a preset gets. A --model in a format this
    project does not load is refused here, first."""
    from hftrain.models import check_checkpoint_format, describe_defaults, model_defaults

    check_checkpoint_format(model)  # a GGUF or pickle-only --model, refused before anything is written
    defaults = model_defaults(model, adapter, parser.get_default("learning_rate"))
    parser.set_defaults(**defaults)
    if os.environ.get("RANK", "0") == "0":
        print(describe_defaults(model, defaults), flush=True)
    return defaults


def check_batch_size(per_device_batch_size: int, num_processes: int, num_train: int) -> None:
    """A batch larger than the data would make every epoch one short batch (per process, under DDP)."""
    per_process = num_train // num_processes
    if per_device_batch_size > per_process:
        each = f" each of the {num_processes} processes gets" if num_processes > 1 else ""
        raise UserError(
            f"--per_device_train_batch_size {per_device_batch_size} is larger than the {per_process} training examples{each}; "
            f"use at most {per_process}, or prepare more data"
        )
