"""--streaming: the blocks prepared data would hold, each DDP process its own part of them, a resumed run
continuing with the next unseen block, and the bad inputs in one sentence."""

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import accelerate_cpu, run_script
from hftrain import task
from hftrain.errors import UserError
from hftrain.streaming import (
    BLOCK_LOG,
    STATE_FILE,
    block_hash,
    check_streaming_args,
    load_streamed,
    stream_blocks,
    stream_documents,
)

BLOCK = 32
# 2 blocks a step: 6 steps of one process, or 3 steps of two, read the same 12 blocks.
STREAM = ["--streaming", "--block_size", str(BLOCK), "--eval_blocks", "4", "--shuffle_buffer", "5", "--report_to", "none"]
STREAM += ["--per_device_train_batch_size", "2", "--warmup_steps", "0", "--logging_steps", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Paragraphs of prose, a few hundred blocks of 32 tokens."""
    documents = task.make_documents(40, 3, min_reviews=3, max_reviews=6)
    path = tmp_path_factory.mktemp("stream") / "corpus.txt"
    path.write_text("\n\n".join(textwrap.fill(d, 80) for d in documents) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(workdir: Path) -> str:
    return str(workdir / "data" / "synthetic" / "tokenizer")


def stream_args(corpus: Path, tokenizer_dir: str, **changes) -> SimpleNamespace:
    args = dict(streaming=True, dataset=str(corpus), model="tiny", tokenizer=tokenizer_dir, block_size=BLOCK)
    return SimpleNamespace(**{**args, "eval_dataset": None, "eval_blocks": 4, "shuffle_buffer": 5, **changes})


@pytest.fixture(scope="module")
def expected(corpus, tokenizer_dir) -> list[str]:
    """The first 12 training blocks of the stream (hashes), read here in one process."""
    stream = iter(load_streamed(stream_args(corpus, tokenizer_dir), blocks_per_step=2, seed=7).train)
    return [block_hash(next(stream)["input_ids"]) for _ in range(12)]


def trained(output_dir: Path) -> dict[str, list[str]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(output_dir.glob("stream_blocks-*.json"))}


def test_streamed_blocks_equal_prepared_blocks(corpus, tokenizer_dir, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from hftrain.data import PrepareArguments, prepare

    prepared = prepare(
        PrepareArguments(
            dataset=str(corpus),
            output_dir=str(tmp_path / "prepared"),
            tokenizer=tokenizer_dir,
            sample_by="paragraph",
            block_size=BLOCK,
        )
    )
    train = load_from_disk(str(prepared / "dataset"))["train"]
    streamed = list(stream_blocks(stream_documents(str(corpus)), AutoTokenizer.from_pretrained(tokenizer_dir), BLOCK))
    # Prepared data holds out the corpus's end: every training block but the last (cut there) is a streamed block.
    n = len(train) - 1
    assert n > 100 and len(streamed) > n
    assert [b["input_ids"] for b in streamed[:n]] == train["input_ids"][:n]
    assert [b["position_ids"] for b in streamed[:n]] == train["position_ids"][:n]


def test_held_out_blocks_are_never_trained_on(corpus, tokenizer_dir):
    all_blocks = [block_hash(b["input_ids"]) for b in load_streamed(stream_args(corpus, tokenizer_dir, eval_blocks=1), 1).test]
    data = load_streamed(stream_args(corpus, tokenizer_dir, shuffle_buffer=0), blocks_per_step=1)
    held_out = [block_hash(b["input_ids"]) for b in data.test]
    train = [block_hash(b["input_ids"]) for b in data.train]
    assert len(held_out) == 4 and not set(held_out) & set(train)  # the stream's first 4 blocks, then the rest
    assert held_out[:1] == all_blocks and len(train) > 100
    separate = load_streamed(stream_args(corpus, tokenizer_dir, shuffle_buffer=0, eval_dataset=str(corpus)), 1)
    assert [block_hash(b["input_ids"]) for b in separate.test] == held_out + train  # --eval_dataset: none skipped


def test_ddp_processes_read_their_own_blocks(corpus, tokenizer_dir, workdir, expected):
    out = workdir / "stream-ddp"
    accelerate_cpu(
        "trainer/getting_started.py", "--dataset", str(corpus), "--tokenizer", tokenizer_dir, *STREAM,
        "--max_steps", "3", "--output_dir", str(out), cwd=workdir, **{BLOCK_LOG: "1"},
    )  # fmt: skip
    seen = trained(out)
    rank0, rank1 = seen["stream_blocks-rank0-from0"], seen["stream_blocks-rank1-from0"]
    assert len(rank0) == len(rank1) == 6 and not set(rank0) & set(rank1)
    # Each step's 4 blocks: the first 2 to process 0, the next 2 to process 1; none skipped, none twice.
    assert [h for step in range(3) for h in rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]] == expected


def test_resumed_run_continues_with_the_next_unseen_block(corpus, tokenizer_dir, workdir, expected, monkeypatch):
    monkeypatch.setenv(BLOCK_LOG, "1")  # in this process's environment: under xdist the runs start as forks of it
    out = workdir / "stream-resume"
    common = ["--dataset", str(corpus), "--tokenizer", tokenizer_dir, *STREAM, "--output_dir", str(out)]
    run_script("trainer/getting_started.py", *common, "--max_steps", "3", cwd=workdir)
    state = json.loads((out / "checkpoint-3" / STATE_FILE).read_text())  # plain JSON, nothing pickled
    assert state["step"] == 3 and state["blocks_per_step"] == 2
    run_script("trainer/getting_started.py", *common, "--max_steps", "6", "--resume_from_checkpoint", "latest", cwd=workdir)
    seen = trained(out)
    assert seen["stream_blocks-rank0-from0"] + seen["stream_blocks-rank0-from3"] == expected
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_accelerate_loop_saves_the_stream_position(corpus, tokenizer_dir, workdir):
    out = workdir / "stream-loop"
    run_script(
        "basic/custom_loop_accelerate.py", "--dataset", str(corpus), "--tokenizer", tokenizer_dir, *STREAM,
        "--max_steps", "2", "--checkpointing_steps", "1", "--output_dir", str(out), cwd=workdir,
    )  # fmt: skip
    stream = load_streamed(stream_args(corpus, tokenizer_dir), blocks_per_step=2, seed=7).train
    blocks = iter(stream)
    for _ in range(4):  # the 2 steps' blocks
        next(blocks)
    for step in (1, 2):
        saved = json.loads((out / f"checkpoint-{step}" / STATE_FILE).read_text())
        assert saved == json.loads(json.dumps({"step": step, "blocks_per_step": 2, "stream": stream.positions[step]}))


def test_bad_streaming_input_in_one_sentence(corpus, tokenizer_dir, tmp_path, workdir):
    def refused(match: str, max_steps: int = 10, **changes) -> None:
        args = stream_args(corpus, tokenizer_dir, **changes)
        with pytest.raises(UserError, match=match):
            check_streaming_args(args, max_steps)
            load_streamed(args, blocks_per_step=2)

    refused("is a folder prepared by prepare_datasets.py.*--data_dir", dataset=str(workdir / "data" / "synthetic"))
    refused("--streaming needs --max_steps", max_steps=-1)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    refused("is one JSON array, which is read whole, not streamed; convert it to JSON Lines", dataset=str(array))
    for name, content in (("empty.txt", ""), ("blank.txt", "\n\n  \n"), ("empty.jsonl", "")):
        (tmp_path / name).write_text(content)
        refused("is empty: there is no text to stream", dataset=str(tmp_path / name))
    (tmp_path / "short.txt").write_text("A few words.\n")
    refused(f"holds [0-9]+ tokens, less than one block of {BLOCK}", dataset=str(tmp_path / "short.txt"))
    refused("holds only [0-9]+ blocks of 32 tokens, none left to train on", eval_blocks=10_000)
    refused("needs --tokenizer", tokenizer=None)
    refused("--pack_rows packs the whole prepared set at once", pack_rows=1280)
    sft = run_script("trainer/sft.py", "--streaming", "--output_dir", str(tmp_path / "sft"), cwd=workdir, check=False)
    assert sft.returncode == 1 and "error: sft.py does not stream" in sft.stderr
