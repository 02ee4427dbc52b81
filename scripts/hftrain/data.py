"""Preparing and loading data: the synthetic task or real text, a tokenizer, padded batches.

`prepare()` writes data/<name>/ with a tokenizer/ folder, the tokenized train and test
splits (`save_to_disk`) and info.json; every training script reads it with `load_prepared()`.
"""

import json
import os
import re
import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hftrain import task
from hftrain.corpus import DEFAULT_BLOCK_SIZE, LOADERS, read_file, split_tail, tokenize_documents
from hftrain.corpus import group_texts as group_texts_
from hftrain.data_folders import (
    check_prepare_target,
    publish_folder,
    record_files,
    source_change,
    source_files,
    temporary_folder,
    verify_files,
)
from hftrain.errors import UserError, cause_of
from hftrain.full_disk import full_disk_cause
from hftrain.models import PRESETS, check_model, check_remote_code, model_positions

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


# The share of a text's characters a tokenizer may lose (they decode to nothing) before preparation stops.
MAX_CHARACTERS_LOST = 0.10


def characters_lost(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """The share of the characters of `texts` (white space aside) that do not come back when their tokens are decoded:
    characters the vocabulary lacks, turned into an unknown token or dropped."""
    total = lost = 0
    for text in texts:
        text = text[:4000]
        back = Counter(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True))
        for char, count in Counter(text).items():
            if not char.isspace():
                total += count
                lost += max(0, count - back[char])
    return lost / total if total else 0.0


def check_characters_kept(tokenizer: PreTrainedTokenizerBase, name: str, texts: list[str], dataset: str) -> None:
    """Refuse a tokenizer that loses more than MAX_CHARACTERS_LOST of the text, and say so when it loses any."""
    share = characters_lost(tokenizer, texts)
    if share > MAX_CHARACTERS_LOST:
        raise UserError(
            f"the tokenizer of {name} loses {share:.0%} of the characters of --dataset {dataset} (they are not in its "
            "vocabulary and decode to nothing), so the model would never see them; use a checkpoint whose tokenizer "
            "covers this text (a byte-level one covers any)"
        )
    if share >= 0.001:
        print(
            f"warning: the tokenizer of {name} loses {share:.1%} of the characters of --dataset {dataset} (not in its vocabulary)"
        )


def is_rating_task(texts: list[str]) -> bool:
    """Examples of the rating task: one line each, ending in "Rating: n"."""
    return all(RATING_TEXT.search(t) and "\n" not in t.strip() for t in texts)


def add_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Many base tokenizers (GPT-2's, Llama 3's) ship without a pad token: pad with EOS, as the Hugging Face examples
    do. Padding is found by the attention mask (see `PadCollator`), so real EOS tokens are still learned."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


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


def _read_source(
    dataset: str,
    text_column: str,
    num_examples: int,
    seed: int,
    test_size: float,
    config_name: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    sample_by: str = "document",
) -> DatasetDict:
    """The raw text: a "train" split and, when the source has one, a "test" split, documents in their order.

    Read with the datasets library's own loaders: `load_dataset` by file extension or Hub name (with its
    config and split names), `load_from_disk` for a saved folder."""
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
            raise UserError(f"--dataset {dataset} is empty; give a UTF-8 text file (or a table) with some text in it")
        raw: Any = _read_file(path, dataset, "line")
        if LOADERS.get(path.suffix.lower(), "text") == "text":
            raw = raw.filter(lambda ex: bool(ex["text"].strip()))
            # Lines that each end in a rating are the rating task's examples; any other text is a corpus,
            # read as whole documents (or paragraphs) so that the model sees text in its context.
            if sample_by != "line" and not is_rating_task(raw["train"]["text"][:200]):
                raw = _read_file(path, dataset, sample_by).filter(lambda ex: bool(ex["text"].strip()))
            text_column = "text"
    elif path.is_dir():
        try:
            raw = load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"--dataset {dataset} is a directory but not a dataset saved with save_to_disk")
        except Exception as e:  # a truncated .arrow or JSON file: pyarrow's and json's errors
            raise UserError(
                f"--dataset {dataset} is a damaged save_to_disk folder ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "save it again"
            )
    elif os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) or dataset.startswith("."):
        raise UserError(f"--dataset {dataset} does not exist; pass 'synthetic', a text file, a saved dataset or a Hub name")
    else:
        try:
            raw = load_dataset(dataset, config_name)
        except Exception as e:
            raise UserError(
                f"could not load the Hub dataset '{dataset}'{f' (config {config_name})' if config_name else ''} "
                f"({type(e).__name__}); check the name and your network, or pass a local file or a dataset saved with save_to_disk"
            )
    if isinstance(raw, Dataset):
        raw = DatasetDict(train=raw)
    if train_split not in raw:
        raise UserError(f"--dataset {dataset} has no '{train_split}' split (it has: {', '.join(raw)}); pass --train_split")
    if eval_split is not None and eval_split not in raw:
        raise UserError(f"--dataset {dataset} has no '{eval_split}' split (it has: {', '.join(raw)}); pass --eval_split")
    held_out = eval_split or next((s for s in ("test", "validation") if s in raw and s != train_split), None)
    splits = {"train": raw[train_split], **({"test": raw[held_out]} if held_out else {})}
    for split in splits.values():
        if text_column not in split.column_names:
            raise UserError(
                f"--dataset {dataset} has no column '{text_column}' (it has: {', '.join(split.column_names)}); pass --text_column"
            )
        feature = split.features[text_column]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            held = f"holds {feature}, not text" if hasattr(feature, "dtype") else _not_text(split[text_column])
            raise UserError(f"--dataset {dataset}: column '{text_column}' {held}; pass --text_column")
    splits = {
        s: _without_empty_rows(d, text_column, f"--dataset {dataset}" + (f" ({s} split)" if held_out else ""))
        for s, d in splits.items()
    }
    if "test" not in splits and len(splits["train"]) < 1:
        raise UserError(f"--dataset {dataset} holds 0 non-empty examples; it needs at least 2 (train and test)")
    return DatasetDict(
        {
            s: d.select_columns([text_column]).rename_columns({text_column: "text"})
            if text_column != "text"
            else d.select_columns(["text"])
            for s, d in splits.items()
        }
    )


def _not_text(values: Any) -> str:
    """What a column of mixed values holds: a JSON file whose rows mix strings and objects loads as one Json column."""
    kinds: dict[type, str] = {dict: "an object", list: "a list"}
    # Objects first: datasets' Json type also decodes a string such as "5" of such a column as a number.
    found = next((i for i, v in enumerate(values) if type(v) in kinds), None)
    found = found if found is not None else next((i for i, v in enumerate(values) if not isinstance(v, str | None)), None)
    if found is None:
        return "holds no text"
    value = values[found]
    return (
        f"holds {kinds.get(type(value), type(value).__name__)} in row {found + 1}, not text (every row's value must be a string)"
    )


def _without_empty_rows(split: Dataset, text_column: str, where: str) -> Dataset:
    """The rows with some text: null cells (an empty CSV cell, a parquet or JSON null) and blank ones are skipped, as
    empty documents hold nothing to learn, and the count is printed."""
    kept = split.filter(lambda ex: ex[text_column] is not None and bool(ex[text_column].strip()), desc="skipping empty rows")
    if len(kept) < len(split):
        print(
            f"{where}: skipping {len(split) - len(kept)} of {len(split)} rows whose '{text_column}' is empty or null", flush=True
        )
    return kept


def _read_file(path: Path, dataset: str, sample_by: str) -> Any:
    try:
        return read_file(path, sample_by)
    except UnicodeDecodeError:
        raise UserError(f"--dataset {dataset} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) and re-run")
    except Exception as e:  # datasets wraps decoding and parsing errors in its own exception types
        if isinstance(e.__cause__, UnicodeDecodeError) or "codec can't decode" in str(e):
            raise UserError(f"--dataset {dataset} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) and re-run")
        if path.suffix.lower() in LOADERS and LOADERS[path.suffix.lower()] != "text":
            raise UserError(
                f"--dataset {dataset} could not be read as {path.suffix} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            )
        raise


@dataclass
class PrepareArguments:
    """What `prepare()` builds and where: scripts/prepare_datasets.py's flags (the shape of run_clm's
    DataTrainingArguments), also what a training script's --dataset passes. Every field but output_dir, force and
    trust_remote_code is recorded in info.json's "request", which a second call must match."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic', 'synthetic-long' (documents of 8-64 reviews), a UTF-8 text file, a .json/.jsonl/.csv/.parquet "
            "file, a folder saved with save_to_disk, or a Hub dataset name."
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write (default: data/<dataset name>[-<checkpoint name>])."}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "The model the data is for: a checkpoint (folder or Hub id) lends its tokenizer and bounds --block_size "
            "by its positions; a preset (tiny, small, 1b) only bounds --block_size."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer to use (local folder or Hub id); default: --model's if it is a checkpoint, else a byte-level "
            "BPE trained on the training split."
        },
    )
    text_column: str = field(default="text", metadata={"help": "The column that holds the text (tables and datasets)."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration (e.g. wikitext-2-raw-v1)."}
    )
    train_split: str | None = field(default=None, metadata={"help": "The split to train on (default: train)."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "The split to evaluate on (default: test or validation if there is one, else the end of --train_split)."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per block of a text corpus (default: min(1024, the model's positions))."},
    )
    sample_by: str | None = field(
        default=None,
        metadata={
            "help": "What one document of a text file is: the whole 'document' (default), each 'paragraph' (blank-line "
            "separated) or each 'line'; EOS goes after each.",
            "choices": ["document", "paragraph", "line"],
        },
    )
    group_texts: bool = field(
        default=True,
        metadata={
            "help": "Concatenate a corpus's documents and cut blocks; false: one example per document, cut to "
            "--max_length and padded (the rating task always is)."
        },
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size of a newly trained tokenizer."})
    max_length: int = field(default=512, metadata={"help": "Examples (not blocks) are cut to this many tokens."})
    test_size: float = field(
        default=0.1, metadata={"help": "Fraction held out for evaluation when the source has no test split."}
    )
    num_examples: int = field(default=6000, metadata={"help": "Size of the synthetic task (train + test)."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic task and of the rating task's train/test split."})
    force: bool = field(default=False, metadata={"help": "Rebuild the folder even if it was prepared with other arguments."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with --model or --tokenizer. Off: only enable for code you trust."},
    )


# Not part of what the data is: where it goes, whether to replace it, whether to run a checkpoint's code.
NOT_RECORDED = ("output_dir", "force", "trust_remote_code")
# info.json's name of a flag whose field was renamed (folders prepared before keep matching).
RECORDED_NAMES = {"tokenizer": "tokenizer_name"}


def recorded_request(args: PrepareArguments) -> dict[str, Any]:
    """The arguments info.json records: a second call matches them, and the rebuild command repeats them."""
    return {RECORDED_NAMES.get(k, k): v for k, v in asdict(args).items() if k not in NOT_RECORDED}


def same_request(recorded: dict[str, Any], request: dict[str, Any]) -> bool:
    """Whether a folder's recorded request asks for what `request` does. An argument it lacks was added to
    prepare_datasets.py after it was prepared, which then made what that argument's default makes."""
    defaults = recorded_request(PrepareArguments())
    return {**defaults, **recorded} == {**defaults, **request}


def rebuild_command(output_dir: str, request: dict[str, Any]) -> str:
    """The prepare_datasets.py command that makes `output_dir` again from its recorded request, quoted for a shell."""
    defaults = recorded_request(PrepareArguments())
    flags = {recorded: flag for flag, recorded in RECORDED_NAMES.items()}
    parts = ["python", "scripts/prepare_datasets.py"]
    if request.get("dataset", "synthetic") != "synthetic":
        parts += ["--dataset", str(request["dataset"])]
    parts += ["--output_dir", str(output_dir)]
    for key, value in request.items():
        if key != "dataset" and value != defaults.get(key) and value is not None:
            parts += [f"--{flags.get(key, key)}", str(value)]
    return shlex.join([*parts, "--force"])


def prepare(args: PrepareArguments) -> Path:
    """Build data/<name>/ once; a second call with the same arguments returns at once.

    The rating task (each example ends in "Rating: n") gives one padded example per review. Any other
    text is a corpus: documents tokenized whole with EOS after each, concatenated and cut into blocks of
    `block_size` tokens (default: min(1024, the model's positions)), the held-out split the end of the
    corpus unless the source has its own. `group_texts=False` keeps one example per document instead."""
    dataset, force, trust_remote_code = args.dataset, args.force, args.trust_remote_code
    max_length, test_size, seed, model, block_size = args.max_length, args.test_size, args.seed, args.model, args.block_size
    output_dir = args.output_dir or default_data_dir(dataset, args.tokenizer or model)
    out = Path(output_dir)
    request = recorded_request(args)
    check_prepare_target(dataset, output_dir, force)  # never over the source, nor over a folder prepare() did not make
    info_path = out / "info.json"
    if info_path.exists() and not force:
        rebuild = rebuild_command(str(out), request)
        info = read_info(out, rebuild)
        if same_request(info["request"], request):
            change = source_change(dataset, info["source_files"]) if "source_files" in info else None
            if change is not None:
                raise UserError(f"--dataset {dataset} changed since it was prepared into {out} ({change}); rebuild it: {rebuild}")
            return out
        raise UserError(
            f"{out} holds data prepared with other arguments; rebuild it with scripts/prepare_datasets.py --force, or "
            "choose another folder (--output_dir there, --data_dir in the training scripts)"
        )
    if max_length < 16:
        raise UserError(f"--max_length {max_length} is too short; use at least 16 tokens")
    if not 0 < test_size < 1:
        raise UserError(f"--test_size {test_size} must be a fraction between 0 and 1")
    tokenizer_name = args.tokenizer or (model if model is not None and model not in PRESETS else None)
    for name, flag in ((model, "--model"), (tokenizer_name, "--tokenizer")):
        if name is not None:
            check_model(name, trust_remote_code, flag)
    positions, positions_of = model_positions(model or tokenizer_name or "tiny", trust_remote_code)
    if block_size is not None and (block_size < 2 or positions is not None and block_size > positions):
        limit = f"the {positions} positions of the model {positions_of}" if positions is not None else "2 tokens"
        raise UserError(
            f"--block_size {block_size} is {'above ' + limit if block_size >= 2 else 'below 2 tokens'}; "
            f"pass a --block_size from 2 to {positions or 'the model positions'} (default: min({DEFAULT_BLOCK_SIZE}, positions))"
        )
    block_size = block_size or min(DEFAULT_BLOCK_SIZE, positions or DEFAULT_BLOCK_SIZE)

    sources = source_files(dataset)  # a local source's size, mtime and hash, before it is read
    raw = _read_source(
        dataset,
        args.text_column,
        args.num_examples,
        seed,
        test_size,
        args.dataset_config_name,
        args.train_split or "train",
        args.eval_split,
        args.sample_by or "document",
    )
    is_rating = is_rating_task(raw["train"]["text"][:200] + (raw["test"]["text"][:200] if "test" in raw else []))
    if "test" not in raw:  # held out from the training split
        if len(raw["train"]) < 2 and (is_rating or not args.group_texts):
            raise UserError(
                f"--dataset {dataset} holds {len(raw['train'])} non-empty examples; it needs at least 2 (train and test)"
            )
        if is_rating:  # independent examples: a random split, as before
            raw = raw["train"].train_test_split(test_size=test_size, seed=seed)
        else:  # text: the end of the corpus, never random lines of it
            raw = split_tail(raw["train"], test_size, whole_documents=not args.group_texts)
    if tokenizer_name is None:
        tokenizer: PreTrainedTokenizerBase = train_tokenizer(raw["train"]["text"], args.vocab_size)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise UserError(
                f"could not load the tokenizer '{tokenizer_name}' ({cause_of(e)}); pass a local directory or omit --tokenizer"
            )
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer '{tokenizer_name}' has no eos token; choose a causal-LM tokenizer")
        check_characters_kept(tokenizer, tokenizer_name, raw["train"]["text"][:200], dataset)
        add_pad_token(tokenizer)
    answers = answer_token_ids(tokenizer) if is_rating else []

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length - 1)["input_ids"]
        ids = [x + [tokenizer.eos_token_id] for x in ids]
        # prompt_len: tokens before the answer; scripts that train on the completion only mask them.
        prompt = [len(x) - 2 if is_rating else 0 for x in ids]
        return {"input_ids": ids, "prompt_len": prompt}

    if is_rating or not args.group_texts:
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
    else:  # documents whole, EOS after each, concatenated and cut into blocks (run_clm's group_texts)
        tokenized = DatasetDict({s: group_texts_(tokenize_documents(raw[s], tokenizer), block_size) for s in ("train", "test")})
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
    try:
        with temporary_folder(out) as tmp:
            tokenizer.save_pretrained(tmp / "tokenizer")
            tokenized.save_to_disk(str(tmp / "dataset"))
            info = {
                "task": "rating" if is_rating else "text",
                "answer_token_ids": answers,
                "num_train": len(tokenized["train"]),
                "num_test": len(tokenized["test"]),
                "max_length": max(max(len(x) for x in tokenized[s]["input_ids"]) for s in ("train", "test")),
                **({"block_size": block_size} if "position_ids" in tokenized["train"].column_names else {}),
                "source": dataset if dataset.startswith("synthetic") or not Path(dataset).exists() else Path(dataset).name,
                "request": request,
                "files": record_files(tmp),  # size, rows and SHA-256 of each file, checked by load_prepared
                **({"source_files": sources} if sources is not None else {}),  # compared when it is reused
            }
            (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            publish_folder(tmp, out, replace=force)  # a replaced folder is deleted only once the new one is in place
    except Exception as e:
        cause = full_disk_cause(e, str(out.parent))
        if cause is None:
            raise
        raise UserError(
            f"no space left in {out.parent} while preparing the data folder {out} (while writing: {cause}); free some "
            "space there, or prepare the data on another disk (prepare_datasets.py --output_dir, then --data_dir)"
        ) from None
    return out


@dataclass
class Prepared:
    tokenizer: PreTrainedTokenizerBase
    train: Dataset
    test: Dataset
    task: str
    answer_token_ids: list[int]
    max_length: int
    source: str = ""  # the dataset it was prepared from (a file name, a Hub id, synthetic), for model cards
    model: str = ""  # the --model it is trained with, set by the script


INFO_FIELDS = ("task", "answer_token_ids", "num_train", "num_test", "max_length", "request")


def read_info(folder: Path, rebuild: str) -> dict[str, Any]:
    """A prepared folder's info.json; one sentence if it is cut short or lacks a field (a copy or a disk that failed)."""
    try:
        info = json.loads((folder / "info.json").read_text())
        missing = [k for k in INFO_FIELDS if k not in info] if isinstance(info, dict) else list(INFO_FIELDS)
        if missing:
            raise ValueError(f"no {missing[0]}")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{folder}/info.json is damaged ({type(e).__name__}); rebuild the prepared data: {rebuild}")
    return info


def default_data_dir(dataset: str, tokenizer: str | None = None) -> str:
    """data/<dataset name>, plus -<checkpoint name> when it is tokenized with a checkpoint's tokenizer."""
    name = dataset if dataset.startswith("synthetic") else Path(dataset.rstrip("/")).stem.replace("/", "_")
    if tokenizer is not None and tokenizer not in PRESETS:
        name += "-" + Path(tokenizer.rstrip("/")).name
    return f"data/{name}"


def data_folder(data_dir: str, dataset: str | None, model: str | None) -> str:
    """Where a training script's data is: --data_dir, or with --dataset and the default --data_dir data/<name>[-<model>]."""
    if dataset is not None and Path(data_dir).resolve() == Path(DEFAULT_DATA_DIR).resolve():
        return default_data_dir(dataset, model)
    return data_dir


def load_prepared(
    data_dir: str = DEFAULT_DATA_DIR, dataset: str | None = None, model: str | None = None, trust_remote_code: bool = False
) -> Prepared:
    """Load data/<name>/; the default synthetic data is prepared on first use.

    With `dataset` (a training script's --dataset), it is prepared first, for `model` (a checkpoint's tokenizer and
    positions), into `data_dir` or, left at its default, data/<name>[-<checkpoint>]: one command from a file to
    training. A second run finds it prepared."""
    if model is not None:  # before anything is written
        check_model(model, trust_remote_code)
    if dataset is not None:
        data_dir = data_folder(data_dir, dataset, model)
        model_ = model if model not in PRESETS else None
        prepare(PrepareArguments(dataset=dataset, output_dir=data_dir, model=model_, trust_remote_code=trust_remote_code))
    path = Path(data_dir)
    if not (path / "info.json").exists():
        if Path(data_dir).resolve() != Path(DEFAULT_DATA_DIR).resolve():
            raise UserError(
                f"no prepared data in {data_dir}; run: python scripts/prepare_datasets.py --dataset <file, folder or Hub name> "
                f"--output_dir {data_dir}"
            )
        prepare(PrepareArguments())
    info = read_info(path, f"python scripts/prepare_datasets.py --dataset <its source> --output_dir {data_dir} --force")
    rebuild = rebuild_command(data_dir, info["request"])
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
    check_remote_code(str(path / "tokenizer"), trust_remote_code, "the prepared tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", trust_remote_code=trust_remote_code)
    add_pad_token(tokenizer)  # folders prepared before the tokenizer got one
    return Prepared(
        tokenizer=tokenizer,
        train=splits["train"],
        test=splits["test"],
        task=info["task"],
        answer_token_ids=info["answer_token_ids"],
        max_length=info["max_length"],
        source=info.get("source", str(data_dir)),
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


def text_blocks(path: str, tokenizer: PreTrainedTokenizerBase, text_column: str, block_size: int) -> Dataset:
    """A text file (or a .json/.jsonl/.csv/.parquet file's `text_column`) as blocks of `block_size` tokens for
    evaluation, all of it held out: read, tokenized and cut as `prepare` cuts a corpus (documents whole, EOS after
    each: a .txt file is one document, a table's rows are documents)."""
    if not Path(path).is_file():
        raise UserError(f"--eval_file {path} does not exist; pass a .txt, .json, .jsonl, .csv or .parquet file")
    if tokenizer.eos_token_id is None:
        raise UserError(
            "the model's tokenizer has no EOS token, which separates documents in the blocks; use a causal-LM tokenizer"
        )
    try:
        raw = _read_source(path, text_column, 0, 0, 0.1)
    except UserError as e:  # the sentences name the flag they were written for
        raise UserError(str(e).replace("--dataset", "--eval_file"))
    blocks = group_texts_(tokenize_documents(raw["train"], tokenizer), block_size)
    if len(blocks) == 0:
        raise UserError(f"--eval_file {path} gives no block of at least 2 tokens; give it more text")
    return blocks
