"""Prepare a dataset for the examples: tokenizer plus tokenized train and test splits in data/<name>/.

The default builds the embedded synthetic rating task and trains a small byte-level BPE
tokenizer on it, with no network. Real data goes through the datasets library's loaders:
a text corpus is tokenized with EOS after each document, concatenated and cut into blocks of
`--block_size` tokens (run_clm's `group_texts`), and its held-out split is the end of the text.

    python scripts/prepare_datasets.py                                   # data/synthetic
    python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 2000 --max_length 2048
                                          # documents of 256-2048 tokens, for throughput and memory runs
    python scripts/prepare_datasets.py --dataset corpus.txt --model path/to/checkpoint --block_size 512
                                          # blocks, the checkpoint's tokenizer -> data/corpus-checkpoint
    python scripts/prepare_datasets.py --dataset reviews.csv --text_column body   # also .json, .jsonl, .parquet
    python scripts/prepare_datasets.py --dataset path/saved_with_save_to_disk --text_column body
    python scripts/prepare_datasets.py --dataset wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --eval_split validation --tokenizer meta-llama/Llama-3.2-1B    # a Hub dataset with a config

Then train on it with `--data_dir data/<name>`, or skip this step: the training scripts take
`--dataset <file or name>` and prepare it for their `--model` themselves. Re-running with the same
arguments does nothing; other arguments for an existing folder need `--force`. A model given as a
checkpoint must share the tokenizer the data was prepared with (pass `--model <that checkpoint>`).

Docs: https://huggingface.co/docs/datasets/loading  https://huggingface.co/docs/tokenizers/quicktour
      https://github.com/huggingface/transformers/blob/main/examples/pytorch/language-modeling/run_clm.py
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hftrain.data import default_data_dir, load_prepared, prepare


@dataclass
class PrepareArguments:
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


def main() -> None:
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses()
    out = prepare(
        dataset=args.dataset,
        output_dir=args.output_dir or default_data_dir(args.dataset, args.tokenizer or args.model),
        tokenizer_name=args.tokenizer,
        text_column=args.text_column,
        vocab_size=args.vocab_size,
        max_length=args.max_length,
        test_size=args.test_size,
        num_examples=args.num_examples,
        seed=args.seed,
        force=args.force,
        model=args.model,
        dataset_config_name=args.dataset_config_name,
        train_split=args.train_split,
        eval_split=args.eval_split,
        sample_by=args.sample_by,
        block_size=args.block_size,
        group_texts=args.group_texts,
        trust_remote_code=args.trust_remote_code,
    )
    data = load_prepared(str(out), trust_remote_code=args.trust_remote_code)
    info = json.loads((out / "info.json").read_text())
    unit = f"blocks of {info['block_size']} tokens" if "block_size" in info else "examples"
    print(
        f"prepared {out}: task {data.task}, {len(data.train)} train / {len(data.test)} test {unit}, "
        f"vocabulary {len(data.tokenizer)}, longest {info['max_length']} tokens"
    )


if __name__ == "__main__":
    main()
