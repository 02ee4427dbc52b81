"""Mistakes a user can make stop before training with one sentence saying what to do."""

import pytest

from conftest import run_script

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
