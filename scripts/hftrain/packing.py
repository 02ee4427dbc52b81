"""Padding-free batches ("packing"): the documents of a batch concatenated into one row, no padding.

`PaddingFreeCollator` turns a list of tokenized documents into a batch of shape [1, total tokens]
whose `position_ids` restart at 0 for every document. Transformers reads the document boundaries
from those positions, so no document attends to another, but only under conditions worth knowing:

- flash_attention_2 finds the boundaries in every attention call (or takes them ready-made as
  `cu_seq_lens_q/k` and `max_length_q/k`, which this collator adds for it) and runs the varlen
  kernel: no padding computed, no mask materialised.
- sdpa and eager get a block-diagonal causal mask (T x T), built in `masking_utils.create_causal_mask`
  from `position_ids`, *only when no attention_mask and no KV cache are passed*. Llama's config has
  `use_cache=True`, so a plain `model(input_ids=..., position_ids=...)` creates an empty cache, skips
  the detection and uses one causal mask over the whole row: documents attend to the earlier ones.
  An all-ones `attention_mask` does the same. The Trainer happens to be safe (it sets
  `config.use_cache = False`); this collator puts `use_cache=False` in every batch so that any
  forward pass on it is safe.

Blocks of a corpus (`hftrain.corpus.group_texts`: documents concatenated, `position_ids` restarting at each)
are cut back into their documents here, so padding-free training isolates the documents inside a block.

Labels: the first token of every document gets -100 (`separator_id`), so the loss never predicts a
document's first token from the end of the previous one. A padded batch never scores it either
(a row's first token has no prediction before it), so padded and packed losses count the very same
target tokens and agree within float rounding.

Docs: https://huggingface.co/blog/packing-with-FA2
      https://huggingface.co/docs/transformers/main_classes/data_collator#transformers.DataCollatorWithFlattening
"""

from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from hftrain.corpus import document_segments


class PaddingFreeCollator:
    """[1, total tokens] batches: input_ids, labels, position_ids, use_cache=False (and FA2's varlen kwargs)."""

    def __init__(self, attn_implementation: str) -> None:
        self.flatten = DataCollatorWithFlattening(
            separator_id=-100,  # a document's first token is no target: nothing is predicted across a boundary
            # cu_seq_lens/max_length spare FA2 deriving them from position_ids in every layer (a GPU sync each);
            # sdpa and eager ignore them, so they are only added where they help.
            return_flash_attn_kwargs=attn_implementation.startswith("flash_attention"),
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.flatten([{"input_ids": doc} for ex in examples for doc in documents_of(ex)])
        batch["use_cache"] = False  # with a cache, sdpa and eager would ignore the document boundaries (see above)
        return batch


def documents_of(example: dict[str, Any]) -> list[list[int]]:
    """The documents in one example: a block of a corpus (`hftrain.corpus.group_texts`) holds several, cut where its
    `position_ids` restart at 0, so that each attends only to itself; any other example is one document."""
    if "position_ids" not in example:
        return [example["input_ids"]]
    ids = example["input_ids"]
    return [ids[start:end] for start, end in document_segments(list(example["position_ids"]))]


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents in one packed row, read off where the positions restart at 0."""
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    return [end - start for start, end in zip(starts, starts[1:] + [position_ids.numel()])]


def split_documents(values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Cut a packed row's per-token values (e.g. logits [1, T, V]) back into one tensor per document."""
    return list(values.reshape(-1, *values.shape[2:]).split(document_lengths(position_ids)))


def packed_rows(dataset: Any, capacity: int) -> Any:
    """A dataset of rows (`documents`: token lists) made from the documents of `dataset` (`input_ids`),
    each row at most `capacity` tokens, every document whole (longer ones are cut to `capacity`)."""
    from datasets import Dataset

    if "position_ids" in dataset.column_names:  # blocks: their documents, each packed on its own
        pairs = zip(dataset["input_ids"], dataset["position_ids"])
        ids = [doc for i, p in pairs for doc in documents_of({"input_ids": i, "position_ids": p})]
    else:
        ids = dataset["input_ids"]
    rows = pack_documents([len(x) for x in ids], capacity)
    return Dataset.from_dict({"documents": [[ids[i][:capacity] for i in row] for row in rows]})


def pack_documents(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of documents grouped into rows of at most `capacity` tokens, first-fit decreasing.

    Whole documents only (none is cut), so each row keeps its documents isolated when flattened
    with `PackedRowsCollator`; rows come out ~97% full on 256-2048-token documents in 2048-token rows.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = min(lengths[i], capacity)
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    return rows


class PackedRowsCollator(PaddingFreeCollator):
    """Like `PaddingFreeCollator`, for examples that each hold several documents (`documents`:
    a list of token lists, see `pack_documents`): a batch of `b` rows is about b x capacity real
    tokens, every step the same size whatever the document lengths.


    With `pad_to`, every batch is filled up to exactly that many tokens by one extra document of
    padding (no targets, its own segment): a fixed shape, so `torch.compile` compiles once instead
    of once per batch length. The padding costs compute (~3% with full rows), not correctness.
    """

    def __init__(self, attn_implementation: str, pad_to: int | None = None, pad_token_id: int = 0) -> None:
        super().__init__(attn_implementation)
        self.pad_to, self.pad_token_id = pad_to, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__([{"input_ids": doc} for ex in examples for doc in ex["documents"]])
        n = batch["input_ids"].shape[1]
        if self.pad_to is None or n >= self.pad_to:
            return batch
        fill = self.pad_to - n
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, fill), self.pad_token_id)], dim=1)
        batch["labels"] = torch.cat([batch["labels"], torch.full((1, fill), -100)], dim=1)
        batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(fill)[None]], dim=1)
        for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if key in batch:
                batch[key] = torch.cat([batch[key], batch[key].new_tensor([self.pad_to])])
        for key in ("max_length_q", "max_length_k"):
            if key in batch:
                batch[key] = max(batch[key], fill)
        return batch
