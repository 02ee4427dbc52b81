"""The benchmark harness on CPU: its smoke run, skipped cases, and the packing its padding-free cases use."""

import json

import pytest
import torch

from conftest import run_script


@pytest.fixture(scope="module")
def smoke(workdir):
    cases = "P1,P2,FA2 padding-free,DDP x2"  # two that run on CPU, two that say why not
    proc = run_script("benchmark.py", "--smoke", "--cases", cases, "--output", "results/smoke/benchmark", cwd=workdir)
    return json.loads((workdir / "results/smoke/benchmark.json").read_text()), proc


def test_smoke_run_measures_every_case_it_can_and_says_why_not_for_the_rest(smoke, workdir):
    result, proc = smoke
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == [
        "P1: padded + SDPA",
        "P2: 2048-token blocks + SDPA",
        "FA2 padding-free",
        "DDP x2: blocks + Liger (big batch)",
    ]
    for name in list(rows)[:2]:
        r = rows[name]
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_time_s"] > 0 and r["loss"] > 0, r
        assert r["flops_per_token"] > 0 and r["gpus"] == 1
    # Blocks are full rows: every step carries micro-batch x T real tokens; padded rows carry fewer.
    assert rows["P2: 2048-token blocks + SDPA"]["tokens_per_step"] == 2 * result["seq_len"]
    assert rows["P1: padded + SDPA"]["tokens_per_step"] < 2 * result["seq_len"]
    assert rows["FA2 padding-free"]["skipped"] == "needs flash-attn and a CUDA GPU"
    assert rows["DDP x2: blocks + Liger (big batch)"]["skipped"].startswith("needs 2 GPUs")
    assert result["versions"]["torch"] == torch.__version__ and result["device"] == "cpu"
    md = (workdir / "results/smoke/benchmark.md").read_text()
    assert "| FA2 padding-free | | skipped: needs flash-attn" in md
    assert (workdir / "results/smoke/benchmark.png").stat().st_size > 0


def test_unknown_case_is_refused(workdir):
    proc = run_script("benchmark.py", "--smoke", "--cases", "P9", cwd=workdir, check=False)
    assert proc.returncode == 1 and "error: unknown case(s) ['P9']" in proc.stderr


def test_packing_keeps_documents_whole_and_rows_within_capacity():
    from hftrain.packing import PackedRowsCollator, pack_documents

    lengths = [300, 2048, 1000, 700, 50, 1500, 256, 900]
    rows = pack_documents(lengths, 2048)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    assert len(rows) == 4  # 6754 tokens need at least 4 rows of 2048

    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    batch = PackedRowsCollator("sdpa")([{"documents": docs[:2]}, {"documents": docs[2:]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8, 9]]  # no target across a boundary

    # A fixed length for torch.compile: one extra padding document, no targets, its own segment.
    fixed = PackedRowsCollator("flash_attention_2", pad_to=12, pad_token_id=0)([{"documents": docs}])
    assert fixed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]]
    assert fixed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert fixed["labels"][0, -3:].tolist() == [-100] * 3
    assert fixed["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12] and fixed["max_length_q"] == 4


def test_a_failed_launch_is_reported_by_the_workers_own_exception():
    from hftrain.cli import worker_error

    stderr = (
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]: KeyError: \"attribute 'weight' already exists\"\n"
        "==================================================\n"
        "    raise ChildFailedError(\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    assert worker_error(stderr, 1) == "[rank1]: KeyError: \"attribute 'weight' already exists\""
    assert worker_error("W1128 a warning\nsomething went wrong\n", 1) == "W1128 a warning / something went wrong"
    assert worker_error("", -9) == "exit status -9"
