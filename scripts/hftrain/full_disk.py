"""A disk that fills during a save ends the run with "no space left in <dir>" instead of torch's or safetensors'
traceback (`report_full_disk`); complete checkpoints stay what `--resume_from_checkpoint latest` picks."""

import errno
import re
import shutil
import sys
from pathlib import Path
from types import TracebackType


def free_bytes(path: str) -> int:
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def full_disk_cause(error: BaseException, folder: str) -> str | None:
    """What was being written when a full disk caused `error` (looking through its causes), else None. torch.save's
    own errors ("file write failed", "unexpected pos") do not name the cause: they count when under 1 GiB is free."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        certain = isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)
        certain = certain or any(s in text for s in ("No space left", "StorageFull", "Disk quota exceeded"))
        torch_write = any(s in text for s in ("file write failed", "inline_container", "unexpected pos"))
        if certain or (torch_write and free_bytes(folder) < 2**30):
            return text.splitlines()[0][:160] if text else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


def full_disk_message(error: BaseException, output_dir: str) -> str | None:
    """The sentence for an error that a full disk caused during a run, else None."""
    cause = full_disk_cause(error, output_dir)
    if cause is None:
        return None
    return (
        f"no space left in {output_dir} (while writing: {cause}); "
        "free some space or choose another --output_dir, then run again: the checkpoints saved completely are kept, "
        "and --resume_from_checkpoint latest continues from the newest"
    )


def report_full_disk(output_dir: str, is_main_process: bool = True) -> None:
    """From now on, an uncaught error that a full disk caused prints one sentence instead of a traceback (the
    status stays 1); the main process also removes the half-written checkpoint-*.tmp folders the loops left."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        message = full_disk_message(error, output_dir)
        if message is None:
            previous(kind, error, tb)
            return
        if is_main_process:
            for partial in Path(output_dir).glob("checkpoint-*.tmp"):
                if re.fullmatch(r"checkpoint-\d+\.tmp", partial.name):  # a loop's save, not a user's folder of that name
                    shutil.rmtree(partial, ignore_errors=True)
        print(f"error: {message}", file=sys.stderr, flush=True)

    sys.excepthook = hook
