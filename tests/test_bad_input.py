"""Mistakes a user can make stop before training with one sentence saying what to do."""

import os
import sys

import pytest
import torch

from conftest import ROOT, SCRIPTS, free_port, run, run_script

GS = "trainer/getting_started.py"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "./no/such/dir"], "--model ./no/such/dir does not exist; pass a preset"),
        (["--model", "someorg/not-downloaded"], "could not load 'someorg/not-downloaded' from the Hugging Face Hub"),
        (
            ["--data_dir", "data/never_prepared"],
            "no prepared data in data/never_prepared; run: python scripts/prepare_datasets.py",
        ),
        (
            ["--resume_from_checkpoint", "latest", "--output_dir", "output/empty"],
            "--resume_from_checkpoint latest: output/empty holds no checkpoint-* folder to resume from",
        ),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size is 0; it must be at least 1"),
        (["--max_steps", "0"], "nothing to train: --max_steps is 0"),
    ],
    ids=["missing-model-dir", "hub-model-offline", "no-data", "resume-without-checkpoint", "batch-size-0", "steps-0"],
)
def test_getting_started_refuses(workdir, args, message):
    proc = run_script(GS, *args, cwd=workdir, check=False)
    assert proc.returncode == 1
    assert f"error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and "'loss'" not in proc.stdout  # stopped before training


def test_output_dir_of_another_run_is_not_overwritten(workdir):
    out = workdir / "output/taken"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    proc = run_script(GS, "--output_dir", str(out), cwd=workdir, check=False)
    assert proc.returncode == 1 and "already holds a training run; pass --overwrite_output_dir" in proc.stderr
    assert (out / "metrics.json").read_text() == "{}"


def test_checkpoint_with_another_vocabulary_is_refused(workdir, tmp_path):
    from hftrain.data import load_prepared
    from hftrain.models import load_model

    tok = load_prepared(str(workdir / "data/synthetic")).tokenizer
    small = load_model("tiny", tok)
    small.resize_token_embeddings(64)
    small.save_pretrained(tmp_path / "small-vocab")
    proc = run_script(GS, "--model", str(tmp_path / "small-vocab"), cwd=workdir, check=False)
    assert proc.returncode == 1 and f"has 64 embeddings but the data's tokenizer has {len(tok)} tokens" in proc.stderr

    tok.add_tokens(["<|extra|>"])  # same size class, other vocabulary
    load_model("tiny", tok).save_pretrained(tmp_path / "other-tok")
    tok.save_pretrained(tmp_path / "other-tok")
    proc = run_script(GS, "--model", str(tmp_path / "other-tok"), cwd=workdir, check=False)
    assert proc.returncode == 1 and "comes with a different tokenizer than the prepared data" in proc.stderr


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda p: p.write_bytes("Überraschung\n".encode("latin-1") * 50), [], "is not UTF-8 text"),
        (lambda p: p.write_text(""), [], "is empty; give a UTF-8 text file"),
        (lambda p: p.write_text("\n \n\n"), [], "holds 0 non-empty examples; it needs at least 2"),
        (None, [], "does not exist; pass 'synthetic', a text file"),
        (
            lambda p: __import__("datasets").Dataset.from_dict({"body": ["a b c"] * 20}).save_to_disk(str(p)),
            [],
            "has no column 'text' (it has: body); pass --text_column",
        ),
    ],
    ids=["not-utf8", "empty-file", "blank-file", "missing-path", "missing-column"],
)
def test_prepare_refuses(tmp_path, make, args, message):
    source = tmp_path / "source.txt" if make is None or "write" in make.__code__.co_names else tmp_path / "saved"
    if make is not None:
        make(source)
    proc = run_script(
        "prepare_datasets.py", "--dataset", str(source if make else "./missing/file.txt"), *args, cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_prepare_refuses_unreachable_hub_dataset(tmp_path):
    proc = run_script("prepare_datasets.py", "--dataset", "someorg/not-downloaded", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "could not load the Hub dataset 'someorg/not-downloaded'" in proc.stderr


def test_data_longer_than_the_model_takes_is_refused(workdir, tmp_path):
    from hftrain.data import load_prepared
    from hftrain.models import load_model

    data = load_prepared(str(workdir / "data/synthetic"))
    short = load_model("tiny", data.tokenizer)
    short.config.max_position_embeddings = 16  # a checkpoint trained on short sequences
    short.save_pretrained(tmp_path / "short")
    data.tokenizer.save_pretrained(tmp_path / "short")
    proc = run_script(GS, "--model", str(tmp_path / "short"), cwd=workdir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = (
        f"error: the prepared data has examples of {data.max_length} tokens but the model {tmp_path / 'short'} takes at most 16"
    )
    assert message in proc.stderr and "--max_length 16" in proc.stderr


def test_accelerate_config_with_more_processes_than_gpus_is_refused(workdir):
    """accelerate_config.yaml asks for 2 processes. Without GPUs accelerate starts both, but each finds no
    process group to join and would train alone, writing the same files; both stop with the sentence instead."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml")]
    cmd += ["--main_process_port", str(free_port()), str(SCRIPTS / GS), "--output_dir", "output/two"]
    proc = run(cmd, cwd=workdir, check=False, CUDA_VISIBLE_DEVICES="")  # no GPU, wherever the test runs
    assert proc.returncode != 0 and not (workdir / "output/two").exists()
    message = "error: 2 processes were launched but only 1 joined the run, as with a multi-GPU config on a machine without GPUs"
    assert message in proc.stderr and "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in proc.stderr


def test_more_processes_per_machine_than_gpus_is_refused(monkeypatch):
    """On a machine with 1 GPU accelerate would put both processes on it (local rank modulo the GPU count)."""
    from hftrain.errors import UserError
    from hftrain.launch import check_launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(
        UserError, match=r"2 processes were launched on this machine but it has 1 GPU\(s\); launch with --num_processes 1"
    ):
        check_launch(num_processes=2, device=torch.device("cuda", 0))
    check_launch(num_processes=2, device=torch.device("cpu"))  # CPU processes (ACCELERATE_USE_CPU=true) need no GPU


def test_corrupt_checkpoint_is_refused(workdir, tmp_path):
    """What a crash during a save leaves (the Trainer writes trainer_state.json last), named explicitly: refused
    before anything is loaded. One case end to end, the others where the script's check runs."""
    from safetensors.torch import save_file

    from hftrain.checkpoints import resolve_checkpoint
    from hftrain.errors import UserError

    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    save_file({"w": torch.zeros(64, 64)}, checkpoint / "model.safetensors")
    torch.save({"state": {}}, checkpoint / "optimizer.pt")
    (checkpoint / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint(str(checkpoint), str(tmp_path)) == str(checkpoint)  # complete

    os.truncate(checkpoint / "optimizer.pt", 100)
    proc = run_script(GS, "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path), cwd=workdir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = (
        f"error: --resume_from_checkpoint {checkpoint} is incomplete or damaged (optimizer.pt is cut short); pass an earlier"
    )
    assert expected in proc.stderr
    for damage, problem in [
        (lambda: os.truncate(checkpoint / "model.safetensors", 100), "model.safetensors is cut short or damaged"),
        (lambda: (checkpoint / "trainer_state.json").unlink(), "it has no trainer_state.json"),
    ]:
        damage()
        with pytest.raises(UserError, match=f"is incomplete or damaged \\({problem}\\)"):
            resolve_checkpoint(str(checkpoint), str(tmp_path))


def test_loop_report_to_a_tracker_not_installed_is_refused(workdir):
    """accelerate skips a tracker whose package is missing with a debug message only: the loop says so instead."""
    from hftrain.cli import check_report_to

    for fine in ("tensorboard", "all", "none"):
        check_report_to(fine)
    proc = run_script("basic/custom_loop_accelerate.py", "--report_to", "tensorboard,no_such_tracker", cwd=workdir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: --report_to no_such_tracker: accelerate has no such tracker installed here" in proc.stderr
