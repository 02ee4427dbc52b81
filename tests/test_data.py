"""The embedded task, the tokenizer, data preparation from each kind of source, and the metric."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, EvalPrediction

from conftest import read_metrics, run_script
from hftrain import task
from hftrain.data import PadCollator, PrepareArguments, load_prepared, prepare, rebuild_command
from hftrain.errors import UserError
from hftrain.metrics import Accuracy
from hftrain.models import PRESETS, load_model
from hftrain.reporting import flops_per_token


def test_reviews_are_balanced_reproducible_and_follow_their_words():
    reviews = task.make_reviews(1000, seed=3)
    assert reviews == task.make_reviews(1000, seed=3) and reviews != task.make_reviews(1000, seed=4)
    assert Counter(r[-1] for r in reviews) == {r: 200 for r in task.RATINGS}
    score = {w: s for s, words in task.ADJECTIVES.items() for w in words}
    for review in reviews[:200]:
        words = [w.strip(".,") for w in review.split()]
        scores = [score[w] for w in words if w in score]
        assert 2 <= len(scores) <= 4 and task.rating_for(scores) == int(review[-1])
    # No single adjective decides: a rating-4 review can hold a neutral word, a rating-3 a positive one.
    assert task.rating_for([2, 1, 0]) == 4 and task.rating_for([1, 0, 0]) == 3 and task.rating_for([-1, -1, 0]) == 2


def test_prepared_synthetic_data_and_tokenizer_load_with_the_library(workdir):
    data = load_prepared(str(workdir / "data/synthetic"))
    assert data.task == "rating" and len(data.train) == 5400 and len(data.test) == 600
    tok = AutoTokenizer.from_pretrained(workdir / "data/synthetic/tokenizer")
    assert tok.get_vocab() == data.tokenizer.get_vocab()
    ids = data.test[0]["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids[-2] in data.answer_token_ids
    assert tok.decode(ids, skip_special_tokens=True).endswith(f"Rating: {tok.decode([ids[-2]]).strip()}")
    # Preparing again with the same arguments is a no-op; other arguments need --force.
    before = (workdir / "data/synthetic/info.json").stat().st_mtime_ns
    prepare(PrepareArguments(output_dir=str(workdir / "data/synthetic")))
    assert (workdir / "data/synthetic/info.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="--force"):
        prepare(PrepareArguments(output_dir=str(workdir / "data/synthetic"), num_examples=100))


def test_prepare_from_text_file_then_train_on_it(workdir, tmp_path):
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(task.make_reviews(2000, seed=11)) + "\n\n", encoding="utf-8")
    proc = run_script("prepare_datasets.py", "--dataset", str(corpus), cwd=workdir)
    assert "prepared data/reviews: task rating, 1800 train / 200 test" in proc.stdout
    out = workdir / "output/from_text"
    run_script(
        "trainer/getting_started.py",
        "--data_dir",
        "data/reviews",
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "4",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        cwd=workdir,
    )
    assert read_metrics(out)["eval_accuracy"] >= 0.6  # learns from 1800 examples read from a file


def test_prepare_plain_text_and_saved_dataset(tmp_path):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog number {i % 7}" for i in range(200)]
    (tmp_path / "plain.txt").write_text("\n".join(lines), encoding="utf-8")
    # One example per line only when asked (the default cuts text into blocks, tests/test_own_data.py); held out: the end.
    plain = prepare(
        PrepareArguments(
            dataset=str(tmp_path / "plain.txt"),
            output_dir=str(tmp_path / "plain"),
            vocab_size=300,
            sample_by="line",
            group_texts=False,
        )
    )
    data = load_prepared(str(plain))
    assert data.task == "text" and data.answer_token_ids == [] and (len(data.train), len(data.test)) == (180, 20)
    assert data.tokenizer.decode(data.test[0]["input_ids"], skip_special_tokens=True) == lines[180]

    Dataset.from_dict({"body": lines, "id": list(range(200))}).save_to_disk(str(tmp_path / "saved"))
    data = load_prepared(
        str(
            prepare(
                PrepareArguments(
                    dataset=str(tmp_path / "saved"), output_dir=str(tmp_path / "from_saved"), text_column="body", block_size=64
                )
            )
        )
    )
    assert data.train.column_names == ["input_ids", "position_ids", "prompt_len"] and len(data.train[0]["input_ids"]) == 64


def test_prepare_with_an_existing_tokenizer_folder(workdir, tmp_path):
    """--tokenizer takes a tokenizer saved with save_pretrained (a model folder, or a Hub id when online)."""
    out = prepare(
        PrepareArguments(
            output_dir=str(tmp_path / "reuse"), tokenizer=str(workdir / "data/synthetic/tokenizer"), num_examples=200
        )
    )
    assert load_prepared(str(out)).tokenizer.get_vocab() == load_prepared(str(workdir / "data/synthetic")).tokenizer.get_vocab()


def test_folders_prepared_before_newer_arguments_still_match(tmp_path):
    """info.json's request of a folder prepared before --model, --block_size and the other later flags existed
    lacks them: preparing it again with those flags at their defaults reuses it, a rebuild command names only
    flags that differ from the defaults, and the command line takes the same dataclass as prepare()."""
    from prepare_datasets import PrepareArguments as CommandLineArguments

    assert CommandLineArguments is PrepareArguments
    out = prepare(PrepareArguments(output_dir=str(tmp_path / "old"), num_examples=100, vocab_size=300))
    info = json.loads((out / "info.json").read_text())
    first_keys = ["dataset", "tokenizer_name", "text_column", "vocab_size", "max_length", "test_size", "num_examples", "seed"]
    assert set(first_keys) <= set(info["request"])
    info["request"] = {k: info["request"][k] for k in first_keys}  # as the first folders recorded it
    (out / "info.json").write_text(json.dumps(info))
    before = (out / "info.json").stat().st_mtime_ns
    assert prepare(PrepareArguments(output_dir=str(out), num_examples=100, vocab_size=300)) == out
    assert (out / "info.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="other arguments"):
        prepare(PrepareArguments(output_dir=str(out), num_examples=100, vocab_size=300, block_size=64))
    rebuild = rebuild_command(str(out), {**info["request"], "tokenizer_name": "tok", "block_size": 64})
    assert rebuild == f"python scripts/prepare_datasets.py --output_dir {out} --tokenizer tok --vocab_size 300 " + (
        "--num_examples 100 --block_size 64 --force"
    )


def test_pad_collator_masks_padding_even_when_pad_is_eos(workdir):
    tok = load_prepared(str(workdir / "data/synthetic")).tokenizer
    tok.pad_token = tok.eos_token
    batch = PadCollator(tok)([{"input_ids": [5, 6, tok.eos_token_id]}, {"input_ids": [7, tok.eos_token_id]}])
    assert batch["labels"].tolist() == [[5, 6, tok.eos_token_id], [7, tok.eos_token_id, -100]]


def test_accuracy_scores_only_the_answer():
    answers = [10, 11, 12, 13, 14]
    labels = torch.tensor([[1, 2, 3, 12, 9], [1, 2, 14, 9, -100]])
    logits = torch.zeros(2, 5, 20)
    logits[0, 2, 12] = 5.0  # right: position 2 predicts token 3 (the answer 12)
    logits[0, 2, 19] = 9.0  # a non-answer token scores higher but is not a rating: ignored
    logits[1, 1, 10] = 5.0  # wrong: predicts 10, the answer is 14
    acc = Accuracy(answers)
    correct = acc.correct(logits, labels)
    assert correct.tolist() == [[1], [0]]
    padded = np.array([[1], [0], [-100]])  # the Trainer pads across batches with -100
    assert acc.compute_metrics(EvalPrediction(predictions=padded, label_ids=padded)) == {"accuracy": 0.5}


def test_presets_and_flops_per_token(workdir):
    tok = load_prepared(str(workdir / "data/synthetic")).tokenizer
    model = load_model("tiny", tok)
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok)
    expected = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 12 * cfg.num_hidden_layers * cfg.hidden_size * 128
    assert flops_per_token(model, 128) == expected  # untied: the input embedding is a lookup, no FLOPs
    assert PRESETS["1b"]["hidden_size"] == 2048 and PRESETS["1b"]["num_hidden_layers"] == 16
    json.dumps(PRESETS)  # plain data, printable in docs
