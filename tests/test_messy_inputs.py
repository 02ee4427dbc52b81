"""Messy data and what a laptop holds: each ends in one sentence or a printed count, never a traceback, and the batches
a pretrained checkpoint gets by default fit a 16 GB machine."""

import errno
import json
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from conftest import run_in_process
from hftrain.data import PrepareArguments, load_prepared, prepare
from hftrain.errors import UserError

DOCUMENTS = [f"Note {i}: the ferry to the island leaves at {i % 12 + 1} o'clock when the sea is calm. " * 2 for i in range(40)]


def rows_with_nulls() -> list[dict]:
    rows = [{"id": i, "text": t} for i, t in enumerate(DOCUMENTS)]
    rows[3]["text"] = None
    rows[10]["text"] = "   "
    return rows


@pytest.mark.parametrize("ext", ["csv", "parquet", "jsonl"])
def test_rows_with_a_null_or_blank_text_are_skipped_with_a_count(ext: str, tmp_path: Path, capsys) -> None:
    """An empty CSV cell, a parquet null, a JSON null: empty documents hold nothing to learn, as run_clm users expect."""
    source = tmp_path / f"notes.{ext}"
    frame = pd.DataFrame(rows_with_nulls())
    if ext == "csv":
        frame.to_csv(source, index=False)  # None is written as an empty cell
    elif ext == "parquet":
        frame.to_parquet(source)
    else:
        frame.to_json(source, orient="records", lines=True)
    out = prepare(PrepareArguments(dataset=str(source), output_dir=str(tmp_path / "data"), vocab_size=300))
    assert f"--dataset {source}: skipping 2 of 40 rows whose 'text' is empty or null" in capsys.readouterr().out
    assert len(load_prepared(str(out)).train) > 0


def test_a_json_column_mixing_text_and_objects_is_refused_naming_the_row(tmp_path: Path) -> None:
    rows: list[dict] = [{"text": t} for t in DOCUMENTS]
    rows[5]["text"] = {"body": "an object"}
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as refused:
        prepare(PrepareArguments(dataset=str(source), output_dir=str(tmp_path / "data")))
    assert str(refused.value) == (
        f"error: --dataset {source}: column 'text' holds an object in row 6, not text (every row's value must be a "
        "string); pass --text_column"
    )


@pytest.mark.parametrize("damage", ["arrow", "dataset_info.json", "state.json"])
def test_a_damaged_save_to_disk_source_is_refused(damage: str, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(saved))
    file = next(saved.glob("*.arrow")) if damage == "arrow" else saved / damage
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a copy cut short
    with pytest.raises(UserError) as refused:
        prepare(PrepareArguments(dataset=str(saved), output_dir=str(tmp_path / "data")))
    assert re.fullmatch(
        rf"error: --dataset {saved} is a damaged save_to_disk folder \(\w+: .+\); save it again", str(refused.value)
    )


def test_a_truncated_info_json_is_named_and_force_repairs_it(tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("\n\n".join(DOCUMENTS))
    out = prepare(PrepareArguments(dataset=str(source), output_dir=str(tmp_path / "data"), vocab_size=300))
    info = out / "info.json"
    info.write_text(info.read_text()[:100])
    rebuild = f"python scripts/prepare_datasets.py --dataset {source} --output_dir {out} --vocab_size 300 --force"
    for again in (
        lambda: prepare(PrepareArguments(dataset=str(source), output_dir=str(out), vocab_size=300)),
        lambda: load_prepared(str(out)),
    ):
        with pytest.raises(UserError) as refused:
            again()
        assert str(refused.value).startswith(f"error: {out}/info.json is damaged (JSONDecodeError); rebuild the prepared data: ")
    assert str(refused.value).endswith(f"--output_dir {out} --force")  # load_prepared cannot read what it was made from
    with pytest.raises(UserError) as refused:
        prepare(PrepareArguments(dataset=str(source), output_dir=str(out), vocab_size=300))
    assert str(refused.value).endswith(rebuild)
    # the command it gives repairs it
    prepare(PrepareArguments(dataset=str(source), output_dir=str(out), vocab_size=300, force=True))
    assert len(load_prepared(str(out)).train) > 0


def test_a_full_disk_or_a_read_only_folder_while_preparing_is_one_sentence(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("\n\n".join(DOCUMENTS))
    out = tmp_path / "data/notes"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(DatasetDict, "save_to_disk", full)
        with pytest.raises(UserError) as refused:
            prepare(PrepareArguments(dataset=str(source), output_dir=str(out), vocab_size=300))
    assert str(refused.value) == (
        f"error: no space left in {out.parent} while preparing the data folder {out} (No space left on device); free some "
        "space there, or prepare the data on another disk (prepare_datasets.py --output_dir, then --data_dir)"
    )
    assert list(out.parent.iterdir()) == []  # the half-written temporary folder is gone

    def read_only(*args, **kwargs):  # what mkdtemp meets in a folder without write permission (root would pass a chmod)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(UserError) as refused:
        prepare(PrepareArguments(dataset=str(source), output_dir=str(out), vocab_size=300))
    assert str(refused.value) == (
        f"error: cannot write the prepared data to {out} (Permission denied); prepare into a folder you can write to"
    )


# ---------------------------------------------------------------- a pretrained checkpoint's batches on a 16 GB machine

# Measured with SmolLM2-135M-Instruct on a CPU (docs/own-data.md): 1024 tokens per training micro-batch peak near 5 GB;
# 2048 did not fit in 10 GB, and the former defaults (32 rows of 1024-token blocks) need tens of GB.
TRAIN_TOKENS, EVAL_TOKENS = 1024, 2048


@pytest.mark.parametrize(
    "script", ["basic/custom_loop.py", "lora/custom_loop.py", "trainer/getting_started.py", "trainer/sft.py"]
)
def test_a_checkpoint_gets_batches_within_a_token_budget(script: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """The defaults line each script prints for a checkpoint (and then runs with): batch sizes that, on the longest rows
    its data gets by default (1024-token blocks; sft.py: --max_length 512), stay within the budget."""
    data, row_tokens = (["--dataset", "chats.jsonl"], 512) if script.endswith("sft.py") else (["--dataset", "corpus.txt"], 1024)
    with pytest.raises(SystemExit):  # --max_steps 0: refused once the defaults are set, before anything is loaded
        run_in_process(script, "--model", "org/model", *data, "--max_steps", "0", cwd=tmp_path, monkeypatch=monkeypatch)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("defaults for a pretrained"))
    sizes = dict(re.findall(r"per_device_(train|eval)_batch_size (\d+)", line))
    assert sizes.keys() == {"train", "eval"}, line
    assert int(sizes["train"]) * row_tokens <= TRAIN_TOKENS and int(sizes["eval"]) * row_tokens <= EVAL_TOKENS, line
