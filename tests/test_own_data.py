"""Your own model and data: text corpora in blocks, file formats, a tokenizer without a pad token, perplexity
before and after, defaults by --model, shareable outputs, the bad inputs; and a real pretrained checkpoint
that gets better on held-out text."""

import json
import math
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, HfArgumentParser

from conftest import read_metrics, run_script
from hftrain import task
from hftrain.data import PrepareArguments, load_prepared, prepare, train_tokenizer
from hftrain.errors import UserError
from hftrain.models import check_checkpoint_format, model_defaults
from hftrain.packing import PaddingFreeCollator
from hftrain.sharing import adapter_base

STEPS = ["--max_steps", "3", "--logging_steps", "1", "--warmup_steps", "0", "--save_strategy", "no"]


def corpus_text(n: int = 6, seed: int = 5) -> str:
    """Paragraphs of prose (reviews wrapped at 80 columns: no line ends in a rating, so it is no rating task)."""
    return "\n\n".join(textwrap.fill(d, 80) for d in task.make_documents(n, seed, min_reviews=8, max_reviews=12)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def padless_checkpoint(tmp_path_factory, corpus) -> Path:
    """A GPT-2-architecture checkpoint (random weights, 256 positions) whose tokenizer has no pad token, as GPT-2's
    and Llama 3's base tokenizers ship."""
    path = tmp_path_factory.mktemp("gpt2-nopad")
    tok = train_tokenizer([corpus.read_text()], vocab_size=400)
    tok.pad_token = None
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)  # safetensors
    return path


# ---------------------------------------------------------------- blocks


def test_corpus_in_blocks_keeps_documents_apart_and_holds_out_the_end(tmp_path, corpus):
    text = corpus.read_text()
    data = load_prepared(
        str(
            prepare(
                PrepareArguments(
                    dataset=str(corpus), output_dir=str(tmp_path / "para"), vocab_size=400, sample_by="paragraph", block_size=64
                )
            )
        )
    )
    tok, eos, bos = data.tokenizer, data.tokenizer.eos_token_id, data.tokenizer.bos_token_id
    assert data.task == "text" and data.max_length == 64
    assert data.train.column_names == ["input_ids", "position_ids", "prompt_len"]
    for split in (data.train, data.test):
        lengths = [len(x) for x in split["input_ids"]]
        assert set(lengths[:-1]) == {64} and 2 <= lengths[-1] <= 64  # full blocks; the last one of a split may be shorter
    # Each document starts (BOS, position 0) right after the previous one's EOS, also inside a block.
    stream = [t for x in data.train["input_ids"] for t in x]
    positions = [p for x in data.train["position_ids"] for p in x]
    starts = [i for i, t in enumerate(stream) if t == bos]
    assert len(starts) >= 4 and all(stream[i - 1] == eos for i in starts[1:])
    assert all(positions[i] == 0 for i in starts)
    inside = [i for i in starts[1:] if i % 64]
    assert inside, "no document starts inside a block: the test corpus is too small"
    for block_index in {i // 64 for i in inside}:  # positions restart where the document starts, and only there
        block = data.train[block_index]["position_ids"]
        zeros = [j for j, p in enumerate(block) if p == 0]
        assert all(b - a == 1 for a, b in zip(block, block[1:]) if b) and set(zeros) - {0} <= {i % 64 for i in inside}
    # The held-out split is the end of the text: train then test give back the file, so no test text is trained on.
    train_text = "".join(tok.decode(x, skip_special_tokens=True) for x in data.train["input_ids"])
    test_text = "".join(tok.decode(x, skip_special_tokens=True) for x in data.test["input_ids"])
    paragraphs = [p.strip() for p in text.split("\n\n")]
    assert (train_text + test_text).replace("\n", "") == "".join(paragraphs).replace("\n", "")
    assert 0.05 < len(test_text) / len(text) < 0.15 and text.rstrip().endswith(test_text.rstrip()[-200:])
    # A document cut by the split gets no EOS where it does not end: one EOS per paragraph over both splits.
    assert sum(x.count(eos) for s in (data.train, data.test) for x in s["input_ids"]) == len(paragraphs)

    # Padding-free batches cut the blocks back into their documents: positions restart, no target crosses a boundary.
    block = data.train[inside[0] // 64]
    batch = PaddingFreeCollator("sdpa")([block])
    restart = inside[0] % 64
    assert batch["position_ids"][0, restart].item() == 0 and batch["labels"][0, restart].item() == -100
    assert batch["input_ids"].shape[1] == 64


def test_a_text_file_is_one_document_by_default_and_lines_only_on_request(tmp_path, corpus):
    data = load_prepared(
        str(prepare(PrepareArguments(dataset=str(corpus), output_dir=str(tmp_path / "doc"), vocab_size=400, block_size=64)))
    )
    eos = data.tokenizer.eos_token_id
    assert sum(x.count(eos) for s in (data.train, data.test) for x in s["input_ids"]) == 1  # only at the end of the file
    lines = prepare(
        PrepareArguments(
            dataset=str(corpus), output_dir=str(tmp_path / "lines"), vocab_size=400, sample_by="line", group_texts=False
        )
    )
    data = load_prepared(str(lines))
    assert "position_ids" not in data.train.column_names and all(x[-1] == eos for x in data.train["input_ids"])
    n_lines = len([ln for ln in corpus.read_text().splitlines() if ln.strip()])
    assert len(data.train) + len(data.test) == n_lines and len(data.test) == round(n_lines * 0.1)


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_each_file_format_gives_the_same_blocks(tmp_path, corpus, ext):
    paragraphs = corpus.read_text().split("\n\n")
    table = Dataset.from_dict({"id": list(range(len(paragraphs))), "text": paragraphs})
    path = tmp_path / f"corpus.{ext}"
    {"jsonl": table.to_json, "json": lambda p: table.to_json(p, lines=False), "csv": table.to_csv, "parquet": table.to_parquet}[
        ext
    ](str(path))
    tokenizer = str(tmp_path / "tok")
    train_tokenizer([corpus.read_text()], 400).save_pretrained(tokenizer)
    data = load_prepared(
        str(prepare(PrepareArguments(dataset=str(path), output_dir=str(tmp_path / ext), tokenizer=tokenizer, block_size=64)))
    )
    reference = load_prepared(
        str(
            prepare(
                PrepareArguments(
                    dataset=str(corpus),
                    output_dir=str(tmp_path / "txt"),
                    tokenizer=tokenizer,
                    block_size=64,
                    sample_by="paragraph",
                )
            )
        )
    )
    # The table's rows are the paragraphs without their separating blank line: the same documents, token for token
    # up to the line breaks at their ends.
    strip = [t for t in reference.tokenizer("\n")["input_ids"] if t != reference.tokenizer.bos_token_id]
    flat = [[t for x in d.train["input_ids"] for t in x if t not in strip] for d in (data, reference)]
    assert flat[0] == flat[1]


def test_named_splits_of_a_saved_dataset(tmp_path, corpus):
    """The code path of Hub datasets (--dataset_config_name, --train_split, --eval_split), on a local DatasetDict."""
    paragraphs = corpus.read_text().split("\n\n")
    DatasetDict(
        {"main": Dataset.from_dict({"body": paragraphs[:-1]}), "heldout": Dataset.from_dict({"body": paragraphs[-1:]})}
    ).save_to_disk(str(tmp_path / "saved"))
    args: dict[str, Any] = dict(text_column="body", vocab_size=400, block_size=32, train_split="main")
    data = load_prepared(
        str(
            prepare(
                PrepareArguments(dataset=str(tmp_path / "saved"), output_dir=str(tmp_path / "a"), eval_split="heldout", **args)
            )
        )
    )
    held_out = "".join(data.tokenizer.decode(x, skip_special_tokens=True) for x in data.test["input_ids"])
    assert held_out == paragraphs[-1]
    with pytest.raises(UserError, match=r"has no 'validation' split \(it has: main, heldout\); pass --eval_split"):
        prepare(
            PrepareArguments(dataset=str(tmp_path / "saved"), output_dir=str(tmp_path / "b"), eval_split="validation", **args)
        )
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- a checkpoint without a pad token, end to end


@pytest.fixture(scope="module")
def padless_runs(tmp_path_factory, padless_checkpoint, corpus):
    """One command from a text file to training with the Trainer (full) and with a LoRA loop, evaluated before and after."""
    work = tmp_path_factory.mktemp("own")
    shutil.copy(corpus, work / "corpus.txt")
    common = ["--model", str(padless_checkpoint), "--dataset", "corpus.txt", "--eval_on_start", "--max_steps", "6"]
    full = run_script(
        "trainer/getting_started.py", *common, "--output_dir", "output/full", "--per_device_train_batch_size", "4",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "2", cwd=work,
    )  # fmt: skip
    lora = run_script(
        "lora/custom_loop.py", *common, "--output_dir", "output/lora", "--per_device_train_batch_size", "4", cwd=work
    )
    return work, full, lora


def test_a_tokenizer_without_pad_token_trains_in_one_command(padless_runs, padless_checkpoint):
    work, full, lora = padless_runs
    data_dir = work / f"data/corpus-{padless_checkpoint.name}"  # prepared with the checkpoint's tokenizer
    info = json.loads((data_dir / "info.json").read_text())
    assert info["block_size"] == 256  # min(1024, the checkpoint's 256 positions)
    saved = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert saved.pad_token == saved.eos_token  # padding with EOS; the attention mask tells them apart
    assert "defaults for a pretrained checkpoint" in full.stdout and "learning_rate 5e-05" in full.stdout
    assert "learning_rate 0.0002, per_device_eval_batch_size 2, modules_to_save none" in lora.stdout  # 2 x 1024 tokens
    for out in ("full", "lora"):
        metrics = read_metrics(work / "output" / out)
        # Perplexity is exp of the loss per target token; the run evaluated before its first step too. The loop's eval_loss
        # is that loss; the Trainer's divides by one more label per row (the first, which nothing predicts): ~1/256 apart.
        exact = 1e-6 if out == "lora" else 2 / 256
        assert math.log(metrics["perplexity"]) == pytest.approx(metrics["eval_loss"], rel=exact)
        assert math.log(metrics["perplexity_before"]) == pytest.approx(metrics["eval_loss_before"], rel=exact)
        assert metrics["perplexity"] < metrics["perplexity_before"]  # random weights: anything learned helps
        evals = [r for r in metrics["log_history"] if "eval_loss" in r]
        assert evals[0]["step"] == 0 and all("eval_perplexity" in r for r in evals)
        assert metrics["task"] == "text" and metrics["dataset"] == "corpus.txt"
    for proc in (full, lora):
        assert "| perplexity " in proc.stdout and "(before " in proc.stdout


def test_outputs_are_shareable_adapter_base_and_model_card(padless_runs, padless_checkpoint):
    work, _, _ = padless_runs
    lora = work / "output/lora"
    config = json.loads((lora / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert not Path(base).is_absolute() and (lora / base).resolve() == padless_checkpoint.resolve()
    assert adapter_base(str(lora)) == str(padless_checkpoint.resolve())
    # Moved with its base, the adapter still finds it: evaluate_model.py from another folder, perplexity in its line.
    moved = work / "moved/a/b/c/lora"
    shutil.copytree(lora, moved)
    shutil.copytree(padless_checkpoint, (moved / base).resolve())  # the same place relative to the adapter
    data_dir = f"data/corpus-{padless_checkpoint.name}"
    proc = run_script("evaluate_model.py", "--model_dir", str(moved), "--data_dir", data_dir, cwd=work)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["adapter"] and result["perplexity"] == pytest.approx(read_metrics(lora)["perplexity"], rel=1e-4)
    for out in ("full", "lora"):
        card = (work / "output" / out / "README.md").read_text()
        assert card.startswith("---\n") and "library_name: " + ("peft" if out == "lora" else "transformers") in card
        metrics = read_metrics(work / "output" / out)
        assert "corpus.txt" in card and f"for {metrics['steps']} optimizer steps" in card
        assert f"| perplexity | {metrics['perplexity_before']:,.4g} | {metrics['perplexity']:,.4g} |" in card
        assert str(Path.home()) not in card and str(work) not in card  # nothing of this machine's paths


# ---------------------------------------------------------------- defaults, plots, bad input


def test_one_rule_for_the_defaults_and_the_flag_wins(capsys):
    assert model_defaults("tiny", adapter=False, preset_learning_rate=3e-3) == {"learning_rate": 3e-3}
    assert model_defaults("tiny", adapter=True, preset_learning_rate=1e-2) == {
        "learning_rate": 1e-2,
        "modules_to_save": "embed_tokens,lm_head",
    }
    # A checkpoint's batches by tokens: rows of its data's longest example (default a 1024-token block) fill 1024 tokens.
    batches = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 2}
    assert model_defaults("org/model", adapter=True, preset_learning_rate=1e-2) == {
        "learning_rate": 2e-4,
        **batches,
        "modules_to_save": "",
    }
    assert model_defaults("./ckpt", adapter=False, preset_learning_rate=1e-2) == {"learning_rate": 5e-5, **batches}
    assert model_defaults("./ckpt", False, 1e-2, row_tokens=256) == {
        "learning_rate": 5e-5,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
    }

    from dataclasses import dataclass, field

    from hftrain.cli import parse_command_line

    @dataclass
    class Args:
        model: str = field(default="tiny")
        learning_rate: float = field(default=1e-2)
        modules_to_save: str = field(default="embed_tokens,lm_head")

    def parse(*argv: str) -> Args:
        return parse_command_line(HfArgumentParser(Args), adapter=True, argv=list(argv))[0]

    assert parse("--model", "org/model") == Args("org/model", 2e-4, "")
    assert parse("--model", "org/model", "--learning_rate", "1e-3", "--modules_to_save", "lm_head") == Args(
        "org/model", 1e-3, "lm_head"
    )
    assert parse() == Args()
    assert (
        "defaults for a pretrained checkpoint (org/model): learning_rate 0.0002, modules_to_save none" in capsys.readouterr().out
    )


def test_model_defaults_line_names_only_the_defaults_a_flag_did_not_set(capsys):
    """The start line shows the values the run takes: a default that a flag overrode (however spelled) is left
    out, and with none left there is no line."""
    from dataclasses import dataclass, field

    from hftrain.cli import parse_command_line

    @dataclass
    class Args:
        model: str = field(default="tiny")
        learning_rate: float = field(default=1e-2)
        modules_to_save: str = field(default="embed_tokens,lm_head")

    def run(*argv: str) -> tuple[str, Args]:
        args = parse_command_line(HfArgumentParser(Args), adapter=True, argv=["--model", "org/model", *argv])[0]
        return capsys.readouterr().out.strip(), args

    line, args = run()
    assert line.startswith("defaults for a pretrained checkpoint (org/model): learning_rate 0.0002, modules_to_save none")
    assert (args.learning_rate, args.modules_to_save) == (2e-4, "")
    for flag in (["--learning_rate", "1e-3"], ["--learning_rate=1e-3"], ["--learning-rate", "1e-3"]):  # argparse's spellings
        line, args = run(*flag)
        assert args.learning_rate == 1e-3 and "learning_rate" not in line and "modules_to_save none" in line, (flag, line)
    line, args = run("--learning_rate", "1e-3", "--modules_to_save", "lm_head")
    assert line == "" and (args.learning_rate, args.modules_to_save) == (1e-3, "lm_head")


def test_chance_line_only_on_rating_data(tmp_path, monkeypatch):
    import matplotlib.axes

    from hftrain.reporting import save_curves

    lines = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y, **kw: lines.append(y))
    history = [{"step": 1, "loss": 3.0}, {"step": 1, "eval_loss": 2.0, "eval_accuracy": 0.4}]
    save_curves(history, tmp_path / "text.png", task="text")
    assert lines == [] and (tmp_path / "text.png").exists()
    save_curves(history, tmp_path / "rating.png", task="rating")
    assert lines == [0.2]


def test_bad_block_size_and_columns_are_refused_before_anything_is_written(tmp_path, corpus, padless_checkpoint):
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(block_size=0), "--block_size 0 is below 2 tokens"),
        (dict(block_size=2048), "--block_size 2048 is above the 1024 positions of the model tiny"),
        (dict(block_size=512, model=str(padless_checkpoint)), "--block_size 512 is above the 256 positions of the model"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            prepare(PrepareArguments(dataset=str(corpus), output_dir=str(tmp_path / "out"), **kwargs))
    table = tmp_path / "reviews.csv"
    Dataset.from_dict({"body": ["good"] * 4, "stars": [5] * 4}).to_csv(str(table))
    with pytest.raises(UserError, match=r"has no column 'text' \(it has: body, stars\); pass --text_column"):
        prepare(PrepareArguments(dataset=str(table), output_dir=str(tmp_path / "out")))
    with pytest.raises(UserError, match=r"column 'stars' holds Value\('int64'\), not text"):
        prepare(PrepareArguments(dataset=str(table), output_dir=str(tmp_path / "out"), text_column="stars"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_gguf_and_pickle_only_checkpoints_are_refused_with_what_to_do(tmp_path, corpus, padless_checkpoint):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"is a GGUF file.*gguf_file='model.Q4_K_M.gguf'\)\.save_pretrained"):
        check_checkpoint_format(str(gguf))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(padless_checkpoint / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match=r"holds only pickled weights \(pytorch_model.bin\).*re-save it as safetensors"):
        check_checkpoint_format(str(pickled))
    # Through a script, with --dataset: the sentence comes before any data is prepared or output written.
    shutil.copy(corpus, tmp_path / "corpus.txt")
    proc = run_script("lora/custom_loop.py", "--model", str(gguf), "--dataset", "corpus.txt", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: --model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "output").exists()
    proc = run_script("trainer/qlora.py", "--push_to_hub", "--hub_model_id", "me/tiny", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: --push_to_hub shares a fine-tuned model, but --model tiny is a preset" in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "output").exists()


# ---------------------------------------------------------------- a real pretrained checkpoint


@pytest.fixture(scope="module")
def real_data(real_checkpoint, tmp_path_factory) -> Path:
    """Prose prepared with the checkpoint's tokenizer in 64-token blocks, the end of the text held out (2 blocks)."""
    work = tmp_path_factory.mktemp("real")
    (work / "reviews.txt").write_text(corpus_text(n=4, seed=7), encoding="utf-8")
    return prepare(
        PrepareArguments(
            dataset=str(work / "reviews.txt"), output_dir=str(work / "data/blocks64"), model=str(real_checkpoint), block_size=64
        )
    )


def test_real_checkpoint_lora_lowers_held_out_perplexity(real_checkpoint, real_data):
    """Plain LoRA (no modules_to_save for a pretrained base) from the loop: perplexity before and after."""
    work = real_data.parent.parent
    proc = run_script(
        "lora/custom_loop.py", "--model", str(real_checkpoint), "--data_dir", str(real_data), "--output_dir", "output/lora",
        "--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--max_steps", "3", "--warmup_steps", "0",
        "--eval_on_start", cwd=work,
    )  # fmt: skip
    metrics = read_metrics(work / "output/lora")
    assert metrics["perplexity"] < 0.9 * metrics["perplexity_before"], proc.stdout[-500:]
    assert "modules_to_save none" in proc.stdout
    steps_per_epoch = math.ceil(json.loads((real_data / "info.json").read_text())["num_train"] / 2)
    assert f"epoch {3 / steps_per_epoch:.3g}: eval loss" in proc.stdout  # the share of an epoch it ran, not "epoch 1"
    assert (work / "output/lora/adapter_model.safetensors").stat().st_size < 30e6  # the adapter, no embedding copies


def test_real_checkpoint_full_training_lowers_held_out_perplexity(real_checkpoint, real_data):
    work = real_data.parent.parent
    run_script(
        "trainer/getting_started.py", "--model", str(real_checkpoint), "--data_dir", str(real_data), "--output_dir", "output/full",
        "--per_device_train_batch_size", "2", "--eval_on_start", "--eval_strategy", "no", *STEPS, cwd=work,
    )  # fmt: skip
    metrics = read_metrics(work / "output/full")
    assert metrics["perplexity"] < 0.9 * metrics["perplexity_before"]


def test_evaluate_any_text_file_with_the_models_tokenizer(start_checkpoint, tmp_path):
    """evaluate_model.py --eval_file: a .txt file and the same text as a .jsonl column give the same blocks and loss;
    the perplexity is exp of the loss per target token; a 4-bit full model evaluates too (no training involved)."""
    text = corpus_text(3, 7)
    (tmp_path / "mine.txt").write_text(text)
    (tmp_path / "mine.jsonl").write_text(json.dumps({"body": text}) + "\n")

    def evaluate(*args: str) -> dict:
        proc = run_script("evaluate_model.py", "--model_dir", start_checkpoint, *args, cwd=tmp_path)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    txt = evaluate("--eval_file", "mine.txt", "--block_size", "64")
    jsonl = evaluate("--eval_file", "mine.jsonl", "--text_column", "body", "--block_size", "64")
    tokens = len(AutoTokenizer.from_pretrained(start_checkpoint)(text)["input_ids"]) + 1  # and the EOS after it
    assert txt["num_examples"] == -(-tokens // 64) and txt["num_tokens"] == tokens - txt["num_examples"]
    assert jsonl["eval_loss"] == pytest.approx(txt["eval_loss"]) and jsonl["num_tokens"] == txt["num_tokens"]
    assert 100 < txt["perplexity"] < 2000  # a random tiny model: about its vocabulary's size
    quantised = evaluate("--eval_file", "mine.txt", "--block_size", "64", "--load_in_4bit")
    assert quantised["load_in_4bit"] and quantised["perplexity"] == pytest.approx(txt["perplexity"], rel=0.1)


def test_sft_defaults_for_a_pretrained_lora_teach_a_style():
    """sft.py's rule (chat=True): LoRA on a pretrained checkpoint at 1e-3, which adopts a persona in tens of steps
    where 2e-4 does not (docs/sft.md); the other defaults stay."""
    batches = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 4}  # rows of 512 tokens: 1024 / 2048
    assert model_defaults("org/model", adapter=True, preset_learning_rate=1e-2, row_tokens=512, chat=True) == {
        "learning_rate": 1e-3,
        "modules_to_save": "",
        **batches,
    }
    assert model_defaults("org/model", adapter=False, preset_learning_rate=3e-3, row_tokens=512, chat=True) == {
        "learning_rate": 5e-5,
        **batches,
    }
    assert model_defaults("tiny", adapter=True, preset_learning_rate=1e-2, chat=True)["learning_rate"] == 1e-2
