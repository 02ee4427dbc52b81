"""Nothing lost, nothing unpickled: data preparation deletes only what it made, checkpoints hold nothing our code
unpickles, resume stays inside --output_dir, prepared data is verified, one run per output directory, the plain
loops check their arguments and say when a signal stopped them with nothing saved, and every input below stops
with one sentence.

Runs are short (the tiny preset on 400 examples, a few steps); one 2-process accelerate run is shared.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from conftest import SCRIPTS, accelerate_cpu, run_script
from hftrain.errors import UserError

GS = "trainer/getting_started.py"
SMALL_DATA = "data/safety"
LOOP = ["--data_dir", SMALL_DATA, "--per_device_train_batch_size", "8", "--logging_steps", "1"]
LOOP_CKPT = [*LOOP, "--max_steps", "4", "--checkpointing_steps", "2", "--save_total_limit", "0"]
TRAINER_SHORT = ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"]


def one_sentence(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert f"error: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def small_data(workdir: Path) -> Path:
    from hftrain.data import PrepareArguments, prepare

    return prepare(PrepareArguments(output_dir=str(workdir / SMALL_DATA), num_examples=400))


# ---------------------------------------------------------------- data preparation deletes only what it made


def test_prepare_refuses_a_folder_it_did_not_make(tmp_path):
    from hftrain.data import PrepareArguments, prepare

    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own work")
    for force in (False, True):
        with pytest.raises(UserError, match=f"{mine} exists and was not made by prepare_datasets.py"):
            prepare(PrepareArguments(output_dir=str(mine), num_examples=100, force=force))
    assert (mine / "notes.txt").read_text() == "my own work" and sorted(os.listdir(tmp_path)) == ["mydir"]


def test_prepare_refuses_an_output_that_is_holds_or_sits_in_the_source(tmp_path):
    """`--dataset data/myreviews` once chose data/myreviews as its output and replaced the source with token ids."""
    from hftrain.data import PrepareArguments, prepare

    source = tmp_path / "data/myreviews"
    Dataset.from_dict({"text": [f"review {i} was fine" for i in range(50)]}).save_to_disk(str(source))
    proc = run_script("prepare_datasets.py", "--dataset", "data/myreviews", cwd=tmp_path, check=False)
    one_sentence(proc, "--output_dir data/myreviews is the source dataset itself")
    for output in (tmp_path / "data", source / "prepared"):
        with pytest.raises(UserError, match="the source dataset"):
            prepare(PrepareArguments(dataset=str(source), output_dir=str(output), force=True))
    assert load_from_disk(str(source))["text"][0] == "review 0 was fine"
    assert sorted(os.listdir(tmp_path / "data")) == ["myreviews"]


def test_force_replaces_a_prepared_folder_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    from hftrain.data import PrepareArguments, prepare

    out = tmp_path / "prepared"
    prepare(PrepareArguments(output_dir=str(out), num_examples=100))
    before = json.loads((out / "info.json").read_text())

    def disk_error(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DatasetDict, "save_to_disk", disk_error)
    with pytest.raises(UserError, match=f"no space left in {tmp_path} while preparing the data folder {out}"):
        prepare(PrepareArguments(output_dir=str(out), num_examples=120, force=True))
    assert json.loads((out / "info.json").read_text()) == before  # the old folder, untouched
    assert os.listdir(tmp_path) == ["prepared"]  # no temporary folder left behind
    monkeypatch.undo()

    prepare(PrepareArguments(output_dir=str(out), num_examples=120, force=True))
    assert json.loads((out / "info.json").read_text())["num_train"] == 108
    assert os.listdir(tmp_path) == ["prepared"]  # the old copy, moved aside, is gone


# ---------------------------------------------------------------- prepared data verified on load


def train_arrow(folder: Path) -> Path:
    (path,) = (folder / "dataset/train").glob("*.arrow")
    return path


def test_damaged_prepared_data_is_named_with_the_command_that_rebuilds_it(tmp_path):
    from hftrain.data import PrepareArguments, load_prepared, prepare

    out = prepare(PrepareArguments(output_dir=str(tmp_path / "p"), num_examples=300))
    load_prepared(str(out))
    arrow = train_arrow(out)
    rebuild = f"python scripts/prepare_datasets.py --output_dir {out} --num_examples 300 --force"
    with arrow.open("r+b") as f:  # a zeroed range, as a bad disk or an interrupted copy leaves
        f.seek(arrow.stat().st_size // 3)
        f.write(bytes(4096))
    with pytest.raises(UserError) as e:
        load_prepared(str(out))
    assert f"{out}/dataset/train/{arrow.name} is damaged" in str(e.value) and rebuild in str(e.value)

    prepare(PrepareArguments(output_dir=str(out), num_examples=300, force=True))
    os.truncate(arrow, arrow.stat().st_size // 2)  # cut short
    with pytest.raises(UserError, match=f"dataset/train/{arrow.name} is damaged.*{re.escape(rebuild)}"):
        load_prepared(str(out))


def test_verification_hashes_once_then_trusts_size_and_mtime(tmp_path, monkeypatch):
    import hftrain.data_folders
    from hftrain.data import PrepareArguments, load_prepared, prepare

    out = prepare(PrepareArguments(output_dir=str(tmp_path / "p"), num_examples=300))
    info = json.loads((out / "info.json").read_text())
    arrow = str(train_arrow(out).relative_to(out))
    assert info["files"][arrow]["rows"] == 270 and len(info["files"][arrow]["sha256"]) == 64
    hashed: list[Path] = []
    digest = hftrain.data_folders.file_digest

    def counting_digest(path: Path) -> str:
        hashed.append(path)
        return digest(path)

    monkeypatch.setattr(hftrain.data_folders, "file_digest", counting_digest)
    load_prepared(str(out))
    assert hashed == []  # verified when prepared
    os.utime(out / arrow)  # touched: hashed again, once
    load_prepared(str(out))
    load_prepared(str(out))
    assert [Path(p).name for p in hashed] == [Path(arrow).name]


def test_data_prepared_before_hashes_still_loads_and_counts_its_rows(tmp_path):
    from hftrain.data import PrepareArguments, load_prepared, prepare

    out = prepare(PrepareArguments(output_dir=str(tmp_path / "p"), num_examples=300))
    info = json.loads((out / "info.json").read_text())
    del info["files"]
    (out / "info.json").write_text(json.dumps(info))
    assert len(load_prepared(str(out)).train) == 270
    arrow = train_arrow(out)
    os.truncate(arrow, arrow.stat().st_size // 2)
    with pytest.raises(UserError, match=f"the prepared data in {out} is damaged .*--force"):
        load_prepared(str(out))


# ---------------------------------------------------------------- checkpoints hold nothing our code unpickles


class RunsAShellCommand:
    """What a planted pickle does when unpickled: runs a command (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def loop_run(workdir, small_data):
    """2 processes (gloo), checkpoints at steps 2 and 4; the run lock is taken by the main process only."""
    out = workdir / "output/safety/loop"
    accelerate_cpu("basic/custom_loop_accelerate.py", *LOOP_CKPT, "--output_dir", str(out), cwd=workdir)
    return out


def test_loop_checkpoint_holds_no_pickled_object_of_ours(loop_run):
    checkpoint = loop_run / "checkpoint-2"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [n for n in names if n.startswith("custom_checkpoint")], names
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "loop_state.json"} <= set(names)
    state = json.loads((checkpoint / "loop_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 2 and [row["step"] for row in state["log_history"]] == [1, 2]
    assert not (loop_run / "run.lock").exists()  # released at exit


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_resume_never_runs_a_planted_pickle(workdir, loop_run, tmp_path, planted):
    import torch

    out = workdir / f"output/safety/planted-{planted}"
    shutil.copytree(loop_run / "checkpoint-2", out / "checkpoint-2")
    marker = tmp_path / "marker"
    torch.save(RunsAShellCommand(marker), out / "checkpoint-2" / planted)
    proc = run_script(
        "basic/custom_loop_accelerate.py",
        *LOOP_CKPT,
        "--output_dir",
        str(out),
        "--resume_from_checkpoint",
        "latest",
        cwd=workdir,
        check=False,
    )
    assert not marker.exists(), "the planted pickle ran"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if proc.returncode == 0:  # resumed without loading the planted file
        assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    else:
        one_sentence(proc, f"--resume_from_checkpoint latest: {out / 'checkpoint-2'} holds {planted}")


def test_loop_checkpoint_of_an_earlier_version_is_refused_not_unpickled(tmp_path):
    from hftrain.checkpoints import ACCELERATE_CHECKPOINT, resolve_checkpoint

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"")
    with pytest.raises(UserError, match="custom_checkpoint_0.pkl"):
        resolve_checkpoint("latest", str(tmp_path), ACCELERATE_CHECKPOINT)


# ---------------------------------------------------------------- resume only inside --output_dir; honoured or refused


def test_resume_only_from_a_checkpoint_inside_output_dir(workdir, loop_run):
    other = workdir / "output/safety/other"
    checkpoint = loop_run / "checkpoint-2"
    proc = run_script(
        "basic/custom_loop_accelerate.py",
        *LOOP_CKPT,
        "--output_dir",
        str(other),
        "--resume_from_checkpoint",
        str(checkpoint),
        cwd=workdir,
        check=False,
    )
    one_sentence(proc, f"--resume_from_checkpoint {checkpoint} is not inside --output_dir {other}")
    assert f"cp -r {checkpoint} {other}/" in proc.stderr
    assert not (other / "metrics.json").exists() and not list(other.glob("checkpoint-*"))


def test_neftune_refuses_resume_instead_of_starting_from_zero(workdir):
    proc = run_script("trainer/neftune.py", "--resume_from_checkpoint", "latest", cwd=workdir, check=False)
    one_sentence(proc, "neftune.py does not resume from a checkpoint")


def test_every_trainer_script_honours_or_refuses_resume():
    """A script that takes TrainingArguments (and so --resume_from_checkpoint) passes the resolved checkpoint to
    trainer.train, or refuses the flag (parse_args(..., resumable=False))."""
    scripts = [p for p in SCRIPTS.rglob("*.py") if "hftrain" not in p.parts and "parse_args(" in p.read_text()]
    assert len(scripts) >= 10
    for path in scripts:
        source = path.read_text()
        honours = "resume_from_checkpoint=checkpoint" in source
        refuses = "resumable=False" in source
        assert honours != refuses, path


# ---------------------------------------------------------------- one run per output directory


def test_second_run_on_the_same_output_dir_stops_with_one_sentence(workdir, small_data):
    from hftrain.run_lock import RunLock

    out = workdir / "output/safety/locked"
    lock = RunLock(str(out))
    lock.acquire()  # this test process holds it, as a running training would
    try:
        held = (out / "run.lock").read_text()
        message = f"{out} is in use by another run (process {os.getpid()} on {socket.gethostname()}"
        one_sentence(run_script(GS, *TRAINER_SHORT, "--output_dir", str(out), cwd=workdir, check=False), message)
        proc = accelerate_cpu("basic/custom_loop_accelerate.py", *LOOP, "--output_dir", str(out), cwd=workdir, check=False)
        assert proc.returncode != 0 and f"error: {message}" in proc.stderr
        assert (out / "run.lock").read_text() == held and not (out / "metrics.json").exists()
    finally:
        lock.release()
    assert not (out / "run.lock").exists()


def test_stale_lock_is_taken_over_and_the_lock_released_at_exit(workdir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = workdir / "output/safety/stale"
    out.mkdir(parents=True)
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 1.0}))
    proc = run_script(GS, *TRAINER_SHORT, "--output_dir", str(out), cwd=workdir)
    assert f"taking over the stale lock {out / 'run.lock'}: process {dead.pid} on {socket.gethostname()} is gone" in (
        proc.stdout + proc.stderr
    )
    assert (out / "metrics.json").exists() and not (out / "run.lock").exists()


def test_lock_is_taken_by_one_process_and_released_on_errors(tmp_path):
    from hftrain.run_lock import RunLock

    out = tmp_path / "out"
    first = RunLock(str(out))
    first.acquire()
    with pytest.raises(UserError, match="is in use by another run"):
        RunLock(str(out)).acquire()
    first.release()
    assert not out.exists()  # it made the folder and left it empty: removed with the lock
    RunLock(str(out), is_main_process=False).acquire()  # the other processes of a launch take no lock
    assert not out.exists()


# ---------------------------------------------------------------- the plain loops


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "basic/custom_loop.py",
            ["--gradient_accumulation_steps", "0"],
            "--gradient_accumulation_steps is 0; it must be at least 1",
        ),
        ("lora/custom_loop.py", ["--learning_rate", "-1"], "--learning_rate is -1.0; it must be above 0"),
        (GS, ["--max_steps", "-5"], "--max_steps is -5; pass a number of steps above 0, or -1"),
        (GS, ["--output_dir", "/proc/x"], "cannot write to --output_dir /proc/x"),
    ],
    ids=["loop-accumulation-0", "lora-lr-negative", "trainer-steps-negative", "trainer-unwritable"],
)
def test_bad_arguments_stop_before_any_work(workdir, tmp_path, script, args, message):
    out = ["--output_dir", str(tmp_path / "out")] if "--output_dir" not in args else []
    proc = run_script(script, *args, *out, cwd=workdir, check=False)
    one_sentence(proc, message)
    assert not (tmp_path / "out").exists()


def test_trainer_argument_checks(tmp_path):
    from transformers import TrainingArguments

    from hftrain.cli import check_training_args

    for field, value, message in [
        ("learning_rate", 0.0, "--learning_rate is 0.0; it must be above 0"),
        ("learning_rate", -1.0, "--learning_rate is -1.0; it must be above 0"),
        ("max_steps", -5, "--max_steps is -5; pass a number of steps above 0, or -1"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            check_training_args(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **{field: value}))


def test_loop_argument_checks_cover_every_field():
    from hftrain.cli import check_loop_args

    good = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=1,
        logging_steps=1,
        num_train_epochs=1,
        max_steps=-1,
        learning_rate=1e-3,
        warmup_steps=0,
        max_grad_norm=1.0,
        streaming=False,  # ScriptArguments' stream flags, which check_loop_args checks too
        eval_dataset=None,
        tokenizer=None,
        block_size=None,
    )
    check_loop_args(types.SimpleNamespace(**good))
    for field, value in [
        ("per_device_train_batch_size", 0),
        ("per_device_eval_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("logging_steps", 0),
        ("learning_rate", 0.0),
        ("num_train_epochs", 0),
        ("warmup_steps", -1),
        ("max_steps", -2),
        ("max_grad_norm", 0.0),
        ("num_train_epochs", -1),
    ]:
        with pytest.raises(UserError, match=f"--{field}"):
            check_loop_args(types.SimpleNamespace(**{**good, field: value}))
    with pytest.raises(UserError, match="--checkpointing_steps"):
        check_loop_args(types.SimpleNamespace(**good, checkpointing_steps=-1, save_total_limit=0))


def test_plain_loop_stopped_by_sigterm_says_nothing_was_saved(workdir, small_data):
    from test_reliability import signal_mid_training

    out = workdir / "output/safety/plain_sigterm"
    cmd = [sys.executable, str(SCRIPTS / "basic/custom_loop.py"), *LOOP, "--max_steps", "2000", "--output_dir", str(out)]
    status, output = signal_mid_training(cmd, workdir, re.compile(r"train: .*\| ([3-9]|[1-9][0-9]+)/2000 "))
    assert status == 1, output[-3000:]  # not 143: that status means "checkpoint saved, resume"
    assert "error: stopped by SIGTERM: nothing was saved" in output and "Traceback" not in output
    assert not (out / "model.safetensors").exists() and not (out / "run.lock").exists()


# ---------------------------------------------------------------- one sentence before any work


def test_model_folder_without_weights_says_so(workdir, tmp_path):
    from hftrain.data import load_prepared
    from hftrain.models import load_model

    folder = tmp_path / "config-only"
    load_model("tiny", load_prepared(str(workdir / "data/synthetic")).tokenizer).config.save_pretrained(folder)
    out = tmp_path / "out"
    proc = run_script(GS, "--model", str(folder), "--output_dir", str(out), cwd=workdir, check=False)
    one_sentence(proc, f"--model {folder} has a config.json but no weights (model.safetensors)")
    assert not out.exists()  # the run made the folder and left it empty: the lock took it away again


def test_batch_larger_than_the_dataset_is_refused(workdir, tmp_path):
    proc = run_script(
        GS,
        *TRAINER_SHORT,
        "--per_device_train_batch_size",
        "10000",
        "--output_dir",
        str(tmp_path / "o"),
        cwd=workdir,
        check=False,
    )
    one_sentence(proc, "--per_device_train_batch_size 10000 is larger than the 5400 training examples")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs: room for one tiny-preset checkpoint (~2 MB), not two. Mounting needs root (as in CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("script", ["basic/custom_loop_accelerate.py", GS])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(workdir, small_data, tiny_disk, script):
    from hftrain.checkpoints import ACCELERATE_CHECKPOINT, TRAINER_CHECKPOINT, resolve_checkpoint

    out = tiny_disk / "out"
    required: tuple[str, ...] = ACCELERATE_CHECKPOINT
    args = LOOP_CKPT[:-2]
    if script == GS:
        args = ["--data_dir", SMALL_DATA, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
        args += ["--eval_strategy", "no", "--report_to", "none"]
        required = TRAINER_CHECKPOINT
    proc = run_script(script, *args, "--output_dir", str(out), cwd=workdir, check=False)
    one_sentence(proc, f"no space left in {out}")
    assert "--resume_from_checkpoint latest" in proc.stderr
    assert resolve_checkpoint("latest", str(out), required) == str(out / "checkpoint-2")
    assert not list(out.glob("*.tmp")) and not (out / "run.lock").exists()


def test_full_disk_sentence_names_the_folder(tmp_path, monkeypatch):
    """The errors a full disk raises (torch.save's, safetensors', a plain OSError) all become the one sentence;
    torch.save's own say nothing of the cause, so they count only when the disk is (nearly) full."""
    import hftrain.full_disk
    from hftrain.full_disk import full_disk_message

    ambiguous = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8128 vs 8016")
    assert full_disk_message(ambiguous, str(tmp_path)) is None or psutil.disk_usage(str(tmp_path)).free < 2**30
    monkeypatch.setattr(hftrain.full_disk, "free_bytes", lambda path: 4096)
    for error in [
        OSError(28, "No space left on device", str(tmp_path / "x")),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8128 vs 8016"),
        RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
        Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    ]:
        message = full_disk_message(error, str(tmp_path))
        assert message is not None and message.startswith(f"no space left in {tmp_path} "), error
    assert full_disk_message(ValueError("a bug"), str(tmp_path)) is None
