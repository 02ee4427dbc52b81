"""Corpora larger than memory: `--streaming` reads the text as it trains, in the blocks prepared data would hold.

- `stream_documents`: `--dataset` as a `datasets` IterableDataset (`load_dataset(..., streaming=True)` for a file or a
  Hub name, `to_iterable_dataset()` for a folder saved with `save_to_disk`); a text file is read by paragraph.
- `stream_blocks`: tokenized and cut into blocks on the fly by `hftrain.corpus` (`tokenize_documents`, `group_texts`),
  the functions `prepare_datasets.py` uses, so the blocks are those of `prepare_datasets.py --sample_by paragraph`.
- `load_streamed`: the held-out blocks (`--eval_dataset`, or the stream's first
  `--eval_blocks`, never trained on) in memory, and the training blocks as a `StreamedBlocks`, shuffled in windows.
- `StreamedBlocks` records the stream's position (the datasets library's `state_dict()`, plain JSON) after each
  optimizer step's blocks; `StreamPositionCallback` writes it into each checkpoint (stream_state.json), and a resumed
  run loads it (`load_state_dict`): it continues with the next unseen block, not from the start.

Under DDP every process reads the stream and keeps its own part of each batch (accelerate's `IterableDatasetShard`,
with `dispatch_batches=False`): no block is seen twice or skipped, and every process holds the same position.

Docs: https://huggingface.co/docs/datasets/stream
      https://huggingface.co/docs/datasets/stream#save-a-dataset-checkpoint-and-resume-iterations
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback

from hftrain.corpus import DEFAULT_BLOCK_SIZE, LOADERS, group_texts, tokenize_documents
from hftrain.errors import UserError

STATE_FILE = "stream_state.json"  # in each checkpoint folder: where the stream stood after its last step
BLOCK_LOG = "HFTRAIN_STREAM_LOG"  # set (tests): each process writes the hashes of the blocks its model trained on


@dataclass
class StreamingArguments:
    """The flags of `--streaming` (ScriptArguments holds them, so every script that takes --dataset has them)."""

    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read --dataset as a stream, tokenized and cut into blocks while training (nothing prepared in data/); "
            "for corpora larger than memory or disk. Needs --max_steps."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "With --streaming: held-out text (a file, saved dataset or Hub name), read whole into blocks."},
    )
    eval_blocks: int = field(
        default=64,
        metadata={
            "help": "With --streaming and no --eval_dataset (nor a test split in --dataset): the stream's first blocks "
            "held out for evaluation, never trained on."
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "With --streaming: blocks are shuffled within windows of this many (held in memory); 0: in order."},
    )
    block_size: int | None = field(
        default=None, metadata={"help": "With --streaming: tokens per block (default: min(1024, the model's positions))."}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "With --streaming: the tokenizer (a folder or Hub id); needed for a preset --model, else --model's."},
    )


def check_streaming_args(args: Any, max_steps: int, num_workers: int = 0) -> None:
    """Refuse what a streamed run cannot do, before anything is loaded."""
    if not args.streaming:
        for name in ("eval_dataset", "tokenizer", "block_size"):
            if getattr(args, name) is not None:
                raise UserError(
                    f"--{name} is read with --streaming only; add --streaming, or pass it to scripts/prepare_datasets.py "
                    "and train on the prepared folder (--data_dir)"
                )
        return
    if args.dataset is None or args.dataset.startswith("synthetic"):
        raise UserError(
            "--streaming reads a text corpus as it trains; pass --dataset <text, .jsonl, .csv or .parquet file, "
            "saved dataset or Hub name> (the synthetic task is small: train on it without --streaming)"
        )
    if max_steps is None or max_steps <= 0:
        raise UserError(
            "--streaming needs --max_steps: a stream has no length, so the number of steps cannot come from --num_train_epochs"
        )
    if (Path(args.dataset) / "info.json").is_file():
        raise UserError(
            f"--dataset {args.dataset} is a folder prepared by prepare_datasets.py, not a corpus to stream; train on it "
            f"with --data_dir {args.dataset} and without --streaming"
        )
    if getattr(args, "pack_rows", 0):
        raise UserError(
            "--pack_rows packs the whole prepared set at once; with --streaming use --padding_free (each block keeps its "
            "document boundaries)"
        )
    if num_workers:
        raise UserError(
            "--streaming reads the stream in the training process (its position is saved); drop --dataloader_num_workers"
        )
    if args.eval_blocks < 1 or args.shuffle_buffer < 0:
        raise UserError(
            f"--eval_blocks must be at least 1 and --shuffle_buffer 0 or more (got {args.eval_blocks}, {args.shuffle_buffer})"
        )


def stream_training_args(training_args: Any) -> None:
    """The Trainer settings a stream needs: every process reads the stream itself and accelerate gives each its part of
    every batch (rather than the main process reading and sending each its part), so every process knows the position
    a checkpoint records (`--save_on_each_node` writes it on every machine); on resume the stream's saved position is
    loaded instead of the Trainer replaying the batches already trained on."""
    training_args.accelerator_config.dispatch_batches = False
    training_args.ignore_data_skip = True


def stream_documents(dataset: str, text_column: str = "text", split: str = "train", config_name: str | None = None) -> Any:
    """`dataset` as an IterableDataset of {"text": document}, read lazily; refuses a source that cannot be streamed,
    is empty, or has no text column."""
    path = Path(dataset)
    if path.is_file():
        loader = LOADERS.get(path.suffix.lower(), "text")
        if loader == "json" and _first_character(path) == "[":
            raise UserError(
                f"--dataset {dataset} is one JSON array, which is read whole, not streamed; convert it to JSON Lines "
                "(one object per line, .jsonl) to stream it"
            )
        # A text file is read by paragraph: a whole file as one document would be held in memory at once.
        kwargs = {"sample_by": "paragraph", "keep_linebreaks": True} if loader == "text" else {}
        if path.stat().st_size == 0:
            raise UserError(f"--dataset {dataset} is empty: there is no text to stream")
        try:
            stream = load_dataset(loader, data_files=str(path), split="train", streaming=True, **kwargs)
        except Exception as e:  # the loader reads the first rows to learn the columns
            raise UserError(f"--dataset {dataset} could not be read as {path.suffix} ({type(e).__name__}: {str(e)[:160]})")
    elif path.is_dir():
        try:
            saved = load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"--dataset {dataset} is a directory but not a dataset saved with save_to_disk")
        if isinstance(saved, DatasetDict):
            if split not in saved:
                raise UserError(f"--dataset {dataset} has no '{split}' split (it has: {', '.join(saved)})")
            saved = saved[split]
        stream = saved.to_iterable_dataset()  # memory-mapped Arrow files, read in order
    elif os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) or dataset.startswith("."):
        raise UserError(f"--dataset {dataset} does not exist; pass a text file, a saved dataset or a Hub name")
    else:
        try:
            stream = load_dataset(dataset, config_name, split=split, streaming=True)
        except Exception as e:
            raise UserError(f"could not stream the Hub dataset '{dataset}' split '{split}' ({type(e).__name__}); check the name")
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise UserError(f"--dataset {dataset} is empty: there is no text to stream")
    if text_column not in first:
        raise UserError(
            f"--dataset {dataset} has no column '{text_column}' (it has: {', '.join(first)}); --streaming reads the text from "
            f"a '{text_column}' column: rename yours"
        )
    if not isinstance(first[text_column], str):
        raise UserError(f"--dataset {dataset}: column '{text_column}' holds {type(first[text_column]).__name__}, not text")
    stream = stream.select_columns([text_column])
    if text_column != "text":
        stream = stream.rename_column(text_column, "text")
    stream = stream.cast(Features({"text": Value("string")}))  # known columns: the maps below replace them
    if not path.is_file() or LOADERS.get(path.suffix.lower(), "text") == "text":
        stream = stream.filter(lambda ex: bool(ex["text"] and ex["text"].strip()))  # blank paragraphs, as prepared data drops
        if next(iter(stream.take(1)), None) is None:
            raise UserError(f"--dataset {dataset} is empty: there is no text to stream")
    return stream


def _first_character(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(4096).lstrip()[:1].decode("ascii", "replace")


def stream_blocks(documents: Any, tokenizer: PreTrainedTokenizerBase, block_size: int) -> Any:
    """Blocks of `block_size` tokens with their position_ids, made as the documents stream by (`hftrain.corpus`)."""
    return group_texts(tokenize_documents(documents, tokenizer), block_size)


def shuffle_windows(blocks: Any, window: int, seed: int) -> Any:
    """Blocks shuffled within consecutive windows of `window` blocks, each by (seed, its first block's index).
    `IterableDataset.shuffle(buffer_size)` keeps no buffer in its state_dict, so a resumed run would never see the
    blocks its buffer held; a window is rebuilt from the saved position and continues exactly."""

    def shuffle(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        order = np.random.default_rng([seed, indices[0]]).permutation(len(indices))
        return {name: [rows[i] for i in order] for name, rows in batch.items()}

    return blocks.map(shuffle, batched=True, batch_size=window, with_indices=True)


class StreamedBlocks(torch.utils.data.IterableDataset):
    """The training blocks, read as the DataLoader asks for them; remembers the stream's position after each optimizer
    step's `blocks_per_step` blocks (under DDP: all processes' blocks, since each reads the whole stream)."""

    def __init__(self, blocks: Any, blocks_per_step: int = 1) -> None:
        self.blocks = blocks
        self.blocks_per_step = blocks_per_step
        self.start = blocks.state_dict()  # the stream's beginning, for a pass after the first
        self.step = 0  # the optimizer step the stream stands at (a resumed run's checkpoint)
        self.positions: dict[int, dict[str, Any]] = {}  # step -> the stream's state after that step's blocks
        self.passes = 0

    def resume(self, checkpoint: str) -> None:
        state_file = Path(checkpoint) / STATE_FILE
        if not state_file.is_file():
            raise UserError(
                f"{checkpoint} holds no stream position ({STATE_FILE}): it was not saved by a --streaming run; "
                "resume it without --streaming"
            )
        saved = json.loads(state_file.read_text())
        if saved["blocks_per_step"] != self.blocks_per_step:
            raise UserError(
                f"{checkpoint} was trained on {saved['blocks_per_step']} blocks per step, this run takes {self.blocks_per_step}; "
                "resume with the same batch size, gradient accumulation and number of processes"
            )
        self.blocks.load_state_dict(saved["stream"])
        self.step = saved["step"]

    def __iter__(self) -> Any:
        if self.passes:  # the stream ran out before --max_steps: read it again from its beginning
            self.blocks.load_state_dict(self.start)
        self.passes += 1
        for count, block in enumerate(self.blocks, 1):
            if count % self.blocks_per_step == 0:
                self.step += 1
                self.positions[self.step] = self.blocks.state_dict()
                self.positions.pop(self.step - 16, None)  # the DataLoader reads at most a few steps ahead
            yield block

    def save_position(self, checkpoint: str | Path, step: int) -> None:
        """Write into `checkpoint` where the stream stood after `step` (stream_state.json, plain JSON)."""
        position = {"step": step, "blocks_per_step": self.blocks_per_step, "stream": self.positions[step]}
        (Path(checkpoint) / STATE_FILE).write_text(json.dumps(position) + "\n")


def save_stream_position(train: Any, checkpoint: str, step: int) -> None:
    """A custom loop's checkpoint: with --streaming, where the stream stands after `step` (else nothing)."""
    if isinstance(train, StreamedBlocks):
        train.save_position(checkpoint, step)


def block_hash(input_ids: Any) -> str:
    return hashlib.sha1(np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


class StreamPositionCallback(TrainerCallback):
    """Writes the stream's position into every checkpoint the Trainer saves (stream_state.json, plain JSON). With
    HFTRAIN_STREAM_LOG set (tests), each process also writes the hashes of the blocks its model trained on."""

    def __init__(self, stream: StreamedBlocks) -> None:
        self.stream = stream
        self.first_step = stream.step
        self.hashes: list[str] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero or (args.save_on_each_node and state.is_local_process_zero):
            self.stream.save_position(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if os.environ.get(BLOCK_LOG) and model is not None:  # what the model is given, not what the DataLoader read
            model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, inputs: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
                self.hashes.append(block_hash(ids[mask.bool()].tolist()))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if os.environ.get(BLOCK_LOG):
            name = f"stream_blocks-rank{args.process_index}-from{self.first_step}.json"
            (Path(args.output_dir) / name).write_text(json.dumps(self.hashes) + "\n")


def stream_callbacks(data: Any) -> list[TrainerCallback]:
    """For a streamed `data.train`, the callback that saves its position in each checkpoint."""
    return [StreamPositionCallback(data.train)] if isinstance(data.train, StreamedBlocks) else []


def load_tokenizer(args: Any) -> PreTrainedTokenizerBase:
    from hftrain.data import add_pad_token
    from hftrain.models import PRESETS, check_model

    name = args.tokenizer or (None if args.model in PRESETS else args.model)
    if name is None:
        raise UserError(
            f"--streaming with the preset --model {args.model} needs --tokenizer (a tokenizer folder or Hub id): a stream "
            "is not read ahead to train one"
        )
    trust_remote_code = bool(getattr(args, "trust_remote_code", False))
    check_model(name, trust_remote_code, "--tokenizer" if args.tokenizer else "--model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"could not load the tokenizer '{name}' ({type(e).__name__}); pass a local directory or a Hub id")
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer '{name}' has no eos token; choose a causal-LM tokenizer")
    add_pad_token(tokenizer)
    return tokenizer


def load_streamed(args: Any, blocks_per_step: int, seed: int = 0, checkpoint: str | None = None) -> Any:
    """A `Prepared` whose train split streams: held-out blocks in memory, training blocks read as training goes.
    `blocks_per_step`: blocks read from the stream per optimizer step, by all processes together."""
    from hftrain.data import Prepared
    from hftrain.models import model_positions

    tokenizer = load_tokenizer(args)
    positions, positions_of = model_positions(args.model)
    block_size = args.block_size or min(DEFAULT_BLOCK_SIZE, positions or DEFAULT_BLOCK_SIZE)
    if block_size < 2 or positions is not None and block_size > positions:
        raise UserError(f"--block_size {block_size} must be from 2 to the {positions} positions of the model {positions_of}")
    text_column = getattr(args, "text_column", "text")
    blocks = stream_blocks(stream_documents(args.dataset, text_column), tokenizer, block_size)
    head = list(blocks.take(args.eval_blocks + 1))
    ended = len(head) <= args.eval_blocks  # the whole stream is in `head`
    tokens = sum(len(block["input_ids"]) for block in head)
    if ended and tokens < block_size:
        raise UserError(
            f"--dataset {args.dataset} holds {tokens} tokens, less than one block of {block_size}; pass a smaller "
            "--block_size or more text"
        )
    if args.eval_dataset is not None:
        held_out = list(stream_blocks(stream_documents(args.eval_dataset, text_column), tokenizer, block_size))
    else:  # the stream's first blocks: its end is not known without reading all of it
        held_out, blocks = head[: args.eval_blocks], blocks.skip(args.eval_blocks)
        if ended:
            raise UserError(
                f"--dataset {args.dataset} holds only {len(head)} blocks of {block_size} tokens, none left to train on after "
                f"the {args.eval_blocks} held out; pass a smaller --eval_blocks, --eval_dataset, or more text"
            )
    if args.shuffle_buffer > 1:
        blocks = shuffle_windows(blocks, args.shuffle_buffer, seed)
    train = StreamedBlocks(blocks, blocks_per_step)
    if checkpoint is not None:
        train.resume(checkpoint)
    return Prepared(
        tokenizer=tokenizer,
        train=train,  # type: ignore[arg-type]
        test=Dataset.from_list(held_out),
        task="text",
        answer_token_ids=[],
        max_length=block_size,
        source=Path(args.dataset).name if Path(args.dataset).exists() else args.dataset,
    )
