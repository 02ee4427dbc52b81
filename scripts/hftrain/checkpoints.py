"""Checkpoint integrity and --resume_from_checkpoint: a damaged or incomplete checkpoint is refused in one
sentence, and nothing in one is unpickled."""

import importlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from hftrain.errors import UserError

# What a resumable checkpoint holds. The Trainer writes trainer_state.json last (after the weights, optimizer,
# scheduler and RNG states), so a save cut short by a crash leaves a folder without it. The accelerate loops
# save into a temporary folder and rename it when complete; these are the files their load_state reads.
TRAINER_CHECKPOINT = ("trainer_state.json",)
ACCELERATE_CHECKPOINT = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "loop_state.json")
# Files that the resume paths read with torch.load(weights_only=True); a Trainer checkpoint's training_args.bin
# is a pickle too, but nothing reads it back.
NOT_LOADED = ("training_args.bin",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
# DeepSpeed loads a ZeRO checkpoint's global_step*/ files with torch.load(weights_only=False). They are loaded here
# first with weights_only=True, allowing besides torch's own types only these DeepSpeed classes (an enum, and loss
# scalers: plain objects whose attributes are set): a file that passes holds nothing else that unpickling could call.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file below `folder`, in subfolders too and through symbolic links (a loader follows them as well)."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:  # removed meanwhile (the main process clears a save cut short while the others look)
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        files += [Path(root, name) for name in names if Path(root, name).is_file()]
    return sorted(files)


def loads_without_unpickling(path: Path, strict: bool) -> bool:
    """Whether torch.load(weights_only=True) loads `path` (memory-mapped: only the pickled structure is read, whatever
    the size of the tensors); False for a file that needs other objects unpickled and, if `strict` (a file that will
    be loaded with weights_only=False), for one that fails to load in any other way."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy's RNG state, as accelerate allows

    allowed = list(TORCH_SAFE_GLOBALS)
    try:
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):  # reads the pickle's opcodes only
            if name in DEEPSPEED_SAFE_GLOBALS:
                module, _, attr = name.rpartition(".")
                allowed.append(getattr(importlib.import_module(module), attr))
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return False
    except Exception:
        return not strict  # cut short or damaged: the loader that reads it with weights_only=True fails on it too
    return True


def unpicklable_file(folder: Path) -> str | None:
    """A file below `folder` (relative path) that only unpickling arbitrary objects could load, or None. The accelerate
    loops of earlier versions pickled their scheduler and history (custom_checkpoint_*.pkl, loaded by accelerate with
    weights_only=False); a sharded FSDP checkpoint's `.metadata` and the values in its `.distcp` files are unpickled by
    torch.distributed.checkpoint; any other pickle, a ZeRO checkpoint's global_step*/ files included, must load with
    weights_only=True. A ZeRO checkpoint's `latest` must name a folder inside it: DeepSpeed loads from the one it names."""
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if not re.fullmatch(r"[\w.-]+", tag) or tag in (".", "..") or not (folder / tag).is_dir():
            return "latest (it names a folder outside the checkpoint)"
    for path in checkpoint_files(folder):
        name = str(path.relative_to(folder))
        if path.name.startswith("custom_checkpoint_") or path.name == ".metadata" or path.suffix == ".distcp":
            return name
        pickled = path.suffix in PICKLE_SUFFIXES and name not in NOT_LOADED and zipfile.is_zipfile(path)
        # DeepSpeed reads the files in subfolders with weights_only=False; the rest is read with weights_only=True.
        if pickled and not loads_without_unpickling(path, strict=path.parent != folder):
            return name
    return None


def checkpoint_problem(folder: Path, required: tuple[str, ...] = TRAINER_CHECKPOINT) -> str | None:
    """Why `folder` cannot be resumed from (a file missing or cut short), or None. Reads the weights' headers, not
    their tensors, and the ends of the pickles: fast at any model size."""
    for name in required:
        if not (folder / name).is_file():
            return f"it has no {name}"
    for path in checkpoint_files(folder):
        name = str(path.relative_to(folder))
        try:
            if path.suffix == ".safetensors":  # the header must parse and the tensors it lists must fit the file
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in PICKLE_SUFFIXES and not zipfile.is_zipfile(path):
                # torch.save writes a zip archive, whose directory comes last; a file without is cut short (or a bare
                # pickle, which torch.load(weights_only=False) would unpickle): never loaded
                return f"{name} is cut short"
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:
            return f"{name} is cut short or damaged"
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
        if name is not None and (name.endswith(".metadata") or name.endswith(".distcp")):
            raise UserError(
                f"--resume_from_checkpoint {resume_from_checkpoint}: {folder} is a sharded FSDP checkpoint ({name}), which "
                "torch.distributed.checkpoint loads by unpickling, so nothing was loaded; for resumable FSDP runs set "
                "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config (loaded with weights_only=True), or start "
                "again with --overwrite_output_dir"
            )
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


def _weight_name(name: str) -> str:
    """A weight's name without the wrappers' parts that differ between a checkpoint and the model in memory (DDP's
    `module.`, PEFT's adapter name `default` and its trained copy `modules_to_save` of a module)."""
    return re.sub(r"(^|\.)(module|default|modules_to_save)(?=\.)", "", name).lstrip(".")


def check_same_model(checkpoint: str | None, model: torch.nn.Module) -> None:
    """A checkpoint resumed into a model of another shape (another --model than the run started with) is refused in
    one sentence, before loading fails with a size mismatch: the shapes in its safetensors headers against the model's
    (ZeRO-3 keeps the full shape of a partitioned weight in `ds_shape`)."""
    if not checkpoint:
        return
    shapes = {_weight_name(n): tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                here, there = shapes.get(_weight_name(key)), tuple(f.get_slice(key).get_shape())
                if here is not None and here != there:
                    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "model_type", "")
                    raise UserError(
                        f"--resume_from_checkpoint {checkpoint} was saved from another model than this run's {name} "
                        f"({key} is {list(there)} there, {list(here)} here); resume with the --model the run started "
                        "with, or start again with --overwrite_output_dir"
                    )
