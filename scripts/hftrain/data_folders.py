"""Prepared data folders: written only where they may be, published whole, verified on load.

- `check_prepare_target` refuses to write over anything prepare() did not make (a folder without info.json, the
  source dataset, a folder that holds or sits inside it); `temporary_folder` and `publish_folder` put a new folder
  in place and delete a replaced one only afterwards; `unwritable_message` names a full disk or a read-only folder
  in one sentence.
- `record_files` notes each file's size, rows and SHA-256 in info.json; `verify_files` hashes a file again only
  when its size or mtime changed (cached in `.verified.json`).
- `source_files` records a local source's files; `source_change` says how it changed since.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from hftrain.errors import UserError

VERIFIED_NAME = ".verified.json"

# ---------------------------------------------------------------- data preparation: write only where it may


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_prepare_target(dataset: str, output_dir: str, force: bool) -> None:
    """Refuse an output that is, holds or sits inside the source dataset, and an existing folder that prepare()
    did not make (no info.json): --force replaces only a prepared folder."""
    out = Path(output_dir)
    source = Path(dataset)
    if source.exists():
        s, o = source.resolve(), out.resolve()
        if s == o:
            raise UserError(
                f"--output_dir {output_dir} is the source dataset itself; choose another --output_dir (e.g. {output_dir.rstrip('/')}-prepared)"
            )
        if _inside(s, o):
            raise UserError(f"--output_dir {output_dir} holds the source dataset {dataset}; choose a folder outside it")
        if _inside(o, s):
            raise UserError(f"--output_dir {output_dir} is inside the source dataset {dataset}; choose a folder outside it")
    if out.exists() and not (out / "info.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{output_dir} exists and was not made by prepare_datasets.py (it has no info.json), so it is left alone, "
            "--force included; choose another --output_dir"
        )
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(PREPARED_ENTRIES)) if out.is_dir() else []
    if force and (out / "info.json").exists() and foreign:
        raise UserError(
            f"{output_dir} holds {foreign[0]}, which prepare_datasets.py did not write (a training run's output?), and "
            "--force would delete it with the data; move it out of the folder, or choose another --output_dir"
        )


# What prepare() writes into a data folder (.verified.json and its temporary .verified-* files included).
PREPARED_ENTRIES = ("info.json", "tokenizer", "dataset", ".verified")


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise UserError(f"stopped by {signal.Signals(signum).name}: nothing was prepared (run the same command again)")


def unwritable_message(error: BaseException, folder: Path) -> str | None:
    """The sentence for an error that a full disk or a folder without write permission caused (looking through its
    causes) while data was written to `folder`, else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"no space left in {folder.parent} while preparing the data folder {folder} ({seen.strerror}); free some "
                "space there, or prepare the data on another disk (prepare_datasets.py --output_dir, then --data_dir)"
            )
        if isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write the prepared data to {folder} ({seen.strerror}); prepare into a folder you can write to"
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def temporary_folder(beside: Path) -> Any:
    """A new folder next to `beside` (same file system, so it can be renamed into place), deleted if the block fails;
    a full disk or a read-only folder ends in one sentence."""
    tmp = None
    # SIGTERM (a job's time limit, `kill`) ends the process without cleaning up unless it raises here instead.
    sigterm = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if sigterm:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}-", dir=beside.parent))
        yield tmp
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        message = unwritable_message(e, beside)
        if message is not None:
            raise UserError(message) from None
        raise
    finally:
        if sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def publish_folder(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the complete folder `tmp` to `out`. A prepared `out` is kept if not `replace` (another process
    finished first), else moved aside and deleted only once `tmp` is in place."""
    old = None
    if (out / "info.json").exists():
        if not replace:
            shutil.rmtree(tmp)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)  # replaces nothing but an empty folder
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
            shutil.rmtree(old)
        if (out / "info.json").exists():  # another process renamed its copy in between: keep it
            shutil.rmtree(tmp)
            return
        shutil.rmtree(tmp)
        raise
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------- prepared data verified on load


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size, SHA-256 and (arrow files) rows of every file under `folder`, keyed by relative path; the same
    files are noted as verified (by size and mtime) in .verified.json."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("info.json", VERIFIED_NAME)):
        entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        if path.suffix == ".arrow":
            entry["rows"] = arrow_rows(path)
        files[str(path.relative_to(folder))] = entry
    _write_verified(folder, {name: _stat_key(folder / name) for name in files})
    return files


def _write_verified(folder: Path, verified: dict[str, list[int]]) -> None:
    with contextlib.suppress(OSError):  # a read-only data folder is verified again next time
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(verified, f)
        os.replace(tmp, folder / VERIFIED_NAME)


def verify_files(folder: Path, files: dict[str, dict[str, Any]], rebuild: str) -> None:
    """Check each recorded file; hash only those whose size or mtime changed since they were last verified."""
    try:
        verified = json.loads((folder / VERIFIED_NAME).read_text())
    except (OSError, ValueError):
        verified = {}
    changed = False
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problem = "is missing"
        else:
            key = _stat_key(path)
            if verified.get(name) == key:
                continue
            if key[0] != entry["bytes"]:
                problem = f"is damaged ({key[0]} bytes instead of {entry['bytes']})"
            elif file_digest(path) != entry["sha256"]:
                problem = "is damaged (its content differs from when it was prepared)"
            else:
                verified[name], changed = key, True
                continue
        raise UserError(f"{folder}/{name} {problem}; rebuild the prepared data: {rebuild}")
    if changed:
        _write_verified(folder, verified)


# ---------------------------------------------------------------- the source of prepared data, recorded


def source_files(dataset: str) -> dict[str, list[Any]] | None:
    """Size, mtime and SHA-256 of a local source (a file, or each file of a saved dataset), None for other sources."""
    path = Path(dataset)
    if dataset.startswith("synthetic") or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else p.name: [*_stat_key(p), file_digest(p)] for p in files}


def source_change(dataset: str, recorded: dict[str, list[Any]]) -> str | None:
    """How the local source differs from when it was recorded (`source_files`), or None; a file whose size and mtime
    are unchanged is not hashed again. A source deleted since is no change: the prepared data stands on its own."""
    path = Path(dataset)
    if not path.exists():
        return None
    now = {str(p.relative_to(path)) if p != path else p.name: p for p in ([path] if path.is_file() else path.rglob("*"))}
    now = {name: p for name, p in now.items() if p.is_file()}
    if set(now) != set(recorded):
        return "its files are not the same"
    for name, p in now.items():
        size, mtime, digest = recorded[name]
        if _stat_key(p) != [size, mtime] and (p.stat().st_size != size or file_digest(p) != digest):
            return f"{name} changed" if path.is_dir() else "it changed"
    return None
