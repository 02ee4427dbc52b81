"""Text corpora as training blocks, the way run_clm prepares them, with document boundaries kept.

- `read_file`: a local file through the datasets library's loader for its extension (.txt, .json,
  .jsonl, .csv, .parquet); a text file is one document, or one per paragraph or line (`sample_by`).
- `split_tail`: the held-out split as the end of the corpus's text, so no test text is also trained on
  (a random split of lines puts repeated lines and the neighbours of test lines into training).
- `tokenize_documents`: each document tokenized whole (the tokenizer's BOS, if it adds one) plus EOS.
- `group_texts`: the documents concatenated and cut into blocks of `block_size` tokens (run_clm's
  `group_texts`), each block with `position_ids` that restart at 0 where a document starts: padded
  batches ignore them (a block's documents see each other, as in run_clm), the padding-free collators
  (`hftrain.packing`) cut the block there so that no document attends to another.

Docs: https://github.com/huggingface/transformers/blob/main/examples/pytorch/language-modeling/run_clm.py
      https://huggingface.co/docs/datasets/loading#local-and-remote-files
"""

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import PreTrainedTokenizerBase

# File extension -> the datasets library's packaged loader.
LOADERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
DEFAULT_BLOCK_SIZE = 1024


def read_file(path: Path, sample_by: str = "line") -> Any:
    """A DatasetDict with a "train" split read from `path` by its extension (other extensions are read as text)."""
    loader = LOADERS.get(path.suffix.lower(), "text")
    # A line is one document without its line break; paragraphs and documents keep theirs inside.
    kwargs = {"sample_by": sample_by, "keep_linebreaks": sample_by != "line"} if loader == "text" else {}
    return load_dataset(loader, data_files=str(path), **kwargs)


def split_tail(documents: Dataset, test_size: float, whole_documents: bool = False) -> DatasetDict:
    """Train on the first (1 - test_size) of the corpus's text, hold out the rest: one contiguous tail. The
    document it starts in is cut in two at a space or line break near that point and its first part
    marked `cut`, so that no EOS is put where the document does not end. Nothing held out is trained on.
    `whole_documents`: the last test_size of the documents instead, none cut."""
    if whole_documents:
        n_test = max(1, round(len(documents) * test_size))
        rows = documents.add_column("cut", [False] * len(documents))
        return DatasetDict(train=rows.select(range(len(rows) - n_test)), test=rows.select(range(len(rows) - n_test, len(rows))))
    texts = documents["text"]
    lengths = [len(t) for t in texts]
    cut = round(sum(lengths) * (1 - test_size))  # character where the held-out tail starts
    i, done = 0, 0
    while i < len(texts) - 1 and done + lengths[i] <= cut:
        done += lengths[i]
        i += 1
    text, at = texts[i], cut - done
    at = max(text.rfind("\n", 0, at + 1), text.rfind(" ", 0, at + 1)) + 1 or at  # never inside a word
    head, tail = text[:at], text[at:]
    train = [*({"text": t, "cut": False} for t in texts[:i]), *([{"text": head, "cut": True}] if head.strip() else [])]
    test = [*([{"text": tail, "cut": False}] if tail.strip() else []), *({"text": t, "cut": False} for t in texts[i + 1 :])]
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(test))


def tokenize_documents(dataset: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
    """`input_ids` per document: the whole text (no truncation) followed by EOS (unless the document is `cut` short
    by the held-out split), so that documents stay apart once concatenated."""

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], verbose=False)["input_ids"]  # verbose=False: long documents are expected here
        cut = batch.get("cut") or [False] * len(ids)
        return {"input_ids": [x if c else x + [tokenizer.eos_token_id] for x, c in zip(ids, cut)]}

    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, **_progress(dataset, "tokenizing"))


def group_texts(documents: Any, block_size: int) -> Any:
    """Blocks of `block_size` tokens (the last one of each batch of 1000 documents may be shorter) with
    `position_ids` restarting at each document start and at each block start."""

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        ids = [t for doc in batch["input_ids"] for t in doc]
        positions = [p for doc in batch["input_ids"] for p in range(len(doc))]
        blocks: dict[str, list[Any]] = {"input_ids": [], "position_ids": [], "prompt_len": []}
        for start in range(0, len(ids), block_size):
            block = positions[start : start + block_size]
            offset = block[0]  # a block that starts inside a document counts its positions from there
            for j, p in enumerate(block):
                if p == 0:
                    break
                block[j] = p - offset
            if len(block) < 2:  # a single token has nothing to predict
                continue
            blocks["input_ids"].append(ids[start : start + block_size])
            blocks["position_ids"].append(block)
            blocks["prompt_len"].append(0)  # every token is a target, as for any text
        return blocks

    return documents.map(
        group, batched=True, batch_size=1000, remove_columns=documents.column_names, **_progress(documents, "grouping")
    )


def _progress(dataset: Dataset | IterableDataset, desc: str) -> dict[str, str]:
    """A progress bar's label for a Dataset's map; a streamed IterableDataset maps lazily, without one."""
    return {} if isinstance(dataset, IterableDataset) else {"desc": desc}


def document_segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each document piece in one block, read off where the positions restart at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    return list(zip(starts, starts[1:] + [len(position_ids)]))
