"""Preparing and loading data: the synthetic task or real text, a tokenizer, padded batches.

`prepare()` writes data/<name>/ with a tokenizer/ folder, the tokenized train and test
splits (`save_to_disk`) and info.json; every training script reads it with `load_prepared()`.
"""

import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hftrain import task
from hftrain.errors import UserError
from hftrain.safety import check_prepare_target, publish_folder, rebuild_command, record_files, temporary_folder, verify_files

DEFAULT_DATA_DIR = "data/synthetic"
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
RATING_TEXT = re.compile(r"Rating: [1-5]\s*$")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (the GPT-2 / Llama 3 scheme) trained on `texts`, in the Hugging Face format."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **SPECIAL_TOKENS)


def answer_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the five rating answers; each must be one token after the common prefix."""
    encoded = [tokenizer(f"{task.ANSWER_PREFIX} {r}", add_special_tokens=False)["input_ids"] for r in task.RATINGS]
    prefixes = {tuple(ids[:-1]) for ids in encoded}
    ids = [e[-1] for e in encoded]
    if len(prefixes) != 1 or len(set(ids)) != len(ids):
        raise UserError(
            f"this tokenizer does not encode the ratings 1-5 as single tokens after '{task.ANSWER_PREFIX}'; "
            "use the project's own tokenizer (omit --tokenizer) for the rating task"
        )
    return ids


def _read_source(dataset: str, text_column: str, test_size: float, seed: int, num_examples: int) -> DatasetDict:
    """The raw text splits, read with the datasets library's own loaders."""
    if dataset in ("synthetic", "synthetic-long"):
        make = task.make_reviews if dataset == "synthetic" else task.make_documents
        n_test = max(1, int(num_examples * test_size))
        return DatasetDict(
            train=Dataset.from_dict({"text": make(num_examples - n_test, seed)}),
            test=Dataset.from_dict({"text": make(n_test, seed + 1)}),
        )
    path = Path(dataset)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"--dataset {dataset} is empty; give a UTF-8 text file with one document per line")
        try:
            raw: Any = load_dataset("text", data_files=str(path), split="train")
        except UnicodeDecodeError:
            raise UserError(f"--dataset {dataset} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) and re-run")
        except Exception as e:  # datasets wraps decoding errors in its own exception types
            if isinstance(e.__cause__, UnicodeDecodeError) or "codec can't decode" in str(e):
                raise UserError(f"--dataset {dataset} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) and re-run")
            raise
        raw = raw.filter(lambda ex: bool(ex["text"].strip()))
        text_column = "text"
    elif path.is_dir():
        try:
            raw = load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"--dataset {dataset} is a directory but not a dataset saved with save_to_disk")
    elif os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) or dataset.startswith("."):
        raise UserError(f"--dataset {dataset} does not exist; pass 'synthetic', a text file, a saved dataset or a Hub name")
    else:
        try:
            raw = load_dataset(dataset)
        except Exception as e:
            raise UserError(
                f"could not load the Hub dataset '{dataset}' ({type(e).__name__}); check the name and your "
                "network, or pass a local text file or a dataset saved with save_to_disk"
            )
    if isinstance(raw, DatasetDict):
        if "train" not in raw:
            raise UserError(f"--dataset {dataset} has no 'train' split (it has: {', '.join(raw)})")
        raw = raw if "test" in raw else raw["train"]
    columns = raw.column_names if isinstance(raw, Dataset) else raw["train"].column_names
    if text_column not in columns:
        raise UserError(f"--dataset {dataset} has no column '{text_column}' (it has: {', '.join(columns)}); pass --text_column")
    if isinstance(raw, Dataset):
        if len(raw) < 2:
            raise UserError(f"--dataset {dataset} holds {len(raw)} non-empty examples; it needs at least 2 (train and test)")
        raw = raw.train_test_split(test_size=test_size, seed=seed)
    return DatasetDict(
        {
            split: raw[split].select_columns([text_column]).rename_column(text_column, "text")
            if text_column != "text"
            else raw[split].select_columns(["text"])
            for split in ("train", "test")
        }
    )


def prepare(
    dataset: str = "synthetic",
    output_dir: str = DEFAULT_DATA_DIR,
    tokenizer_name: str | None = None,
    text_column: str = "text",
    vocab_size: int = 1024,
    max_length: int = 512,
    test_size: float = 0.1,
    num_examples: int = 6000,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build data/<name>/ once; a second call with the same arguments returns at once."""
    out = Path(output_dir)
    request = {k: v for k, v in locals().items() if k not in ("output_dir", "force", "out")}
    check_prepare_target(dataset, output_dir, force)  # never over the source, nor over a folder prepare() did not make
    info_path = out / "info.json"
    if info_path.exists() and not force:
        if json.loads(info_path.read_text())["request"] == request:
            return out
        raise UserError(f"{out} holds data prepared with other arguments; pass --force to rebuild it or choose another --name")
    if max_length < 16:
        raise UserError(f"--max_length {max_length} is too short; use at least 16 tokens")

    raw = _read_source(dataset, text_column, test_size, seed, num_examples)
    if tokenizer_name is None:
        tokenizer: PreTrainedTokenizerBase = train_tokenizer(raw["train"]["text"], vocab_size)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        except Exception as e:
            raise UserError(
                f"could not load the tokenizer '{tokenizer_name}' ({type(e).__name__}); pass a local directory or omit --tokenizer"
            )
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer '{tokenizer_name}' has no eos token; choose a causal-LM tokenizer")
    is_rating = all(RATING_TEXT.search(t) for t in raw["test"]["text"][:200] + raw["train"]["text"][:200])
    answers = answer_token_ids(tokenizer) if is_rating else []

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length - 1)["input_ids"]
        ids = [x + [tokenizer.eos_token_id] for x in ids]
        # prompt_len: tokens before the answer; scripts that train on the completion only mask them.
        prompt = [len(x) - 2 if is_rating else 0 for x in ids]
        return {"input_ids": ids, "prompt_len": prompt}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    if is_rating:
        bad = sum(1 for x in tokenized["test"]["input_ids"] if x[-2] not in answers)
        if bad:
            raise UserError(f"{bad} test examples do not end in a rating token; raise --max_length above {max_length}")
    for split in ("train", "test"):
        if len(tokenized[split]) == 0:
            raise UserError(f"--dataset {dataset} gives an empty {split} split; add data or change --test_size")

    # Write beside the target and rename, so a crash or a second process never leaves half a folder (the temporary
    # one is deleted if anything fails). Several machines sharing a disk each prepare their own copy at once
    # (main_process_first is per machine): the first rename wins, and the others find its complete copy and keep it.
    with temporary_folder(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        tokenized.save_to_disk(str(tmp / "dataset"))
        info = {
            "task": "rating" if is_rating else "text",
            "answer_token_ids": answers,
            "num_train": len(tokenized["train"]),
            "num_test": len(tokenized["test"]),
            "max_length": max(max(len(x) for x in tokenized[s]["input_ids"]) for s in ("train", "test")),
            "request": request,
            "files": record_files(tmp),  # size, rows and SHA-256 of each file, checked by load_prepared
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        publish_folder(tmp, out, replace=force)  # a replaced folder is deleted only once the new one is in place
    return out


@dataclass
class Prepared:
    tokenizer: PreTrainedTokenizerBase
    train: Dataset
    test: Dataset
    task: str
    answer_token_ids: list[int]
    max_length: int


def load_prepared(data_dir: str = DEFAULT_DATA_DIR) -> Prepared:
    """Load data/<name>/; the default synthetic data is prepared on first use."""
    path = Path(data_dir)
    if not (path / "info.json").exists():
        if Path(data_dir).resolve() != Path(DEFAULT_DATA_DIR).resolve():
            raise UserError(
                f"no prepared data in {data_dir}; run: python scripts/prepare_datasets.py --dataset <file, folder or Hub name> "
                f"--output_dir {data_dir}"
            )
        prepare()
    info = json.loads((path / "info.json").read_text())
    rebuild = rebuild_command(data_dir, info["request"], lambda key: inspect.signature(prepare).parameters[key].default)
    if "files" in info:  # hashed when prepared; hashed again only when a file's size or mtime changed
        verify_files(path, info["files"], rebuild)
    try:
        splits = load_from_disk(str(path / "dataset"))
        rows = (len(splits["train"]), len(splits["test"]))
    except Exception as e:  # data prepared before the hashes were recorded: unreadable files, or missing rows
        raise UserError(f"the prepared data in {data_dir} is damaged ({type(e).__name__}); rebuild it: {rebuild}")
    if rows != (info["num_train"], info["num_test"]):
        raise UserError(
            f"the prepared data in {data_dir} is damaged ({rows[0]} train / {rows[1]} test rows instead of "
            f"{info['num_train']} / {info['num_test']}); rebuild it: {rebuild}"
        )
    return Prepared(
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        train=splits["train"],
        test=splits["test"],
        task=info["task"],
        answer_token_ids=info["answer_token_ids"],
        max_length=info["max_length"],
    )


class PadCollator:
    """Right-pads a list of examples; labels are the inputs with padding set to -100.

    Labels come from the attention mask, not from `input_ids == pad_token_id`, so a tokenizer
    whose pad token is its eos token still learns to end a document.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad(
            [{"input_ids": ex["input_ids"]} for ex in examples],
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors="pt",
        )
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        if "prompt_len" in examples[0]:
            batch["prompt_len"] = torch.tensor([ex["prompt_len"] for ex in examples])
        return dict(batch)
