"""Prepare a dataset for the examples: tokenizer plus tokenized train and test splits in data/<name>/.

The default builds the embedded synthetic rating task and trains a small byte-level BPE
tokenizer on it, with no network. Real data goes through the datasets library's loaders:

    python scripts/prepare_datasets.py                                   # data/synthetic
    python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 2000 --max_length 2048
                                          # documents of 256-2048 tokens, for throughput and memory runs
    python scripts/prepare_datasets.py --dataset my_corpus.txt           # one document per line -> data/my_corpus
    python scripts/prepare_datasets.py --dataset path/saved_with_save_to_disk --text_column body
    python scripts/prepare_datasets.py --dataset roneneldan/TinyStories --tokenizer meta-llama/Llama-3.2-1B

Then train on it with `--data_dir data/<name>`. Re-running with the same arguments does nothing;
other arguments for an existing folder need `--force`. A model given as a checkpoint must
share the tokenizer the data was prepared with (pass `--tokenizer <that model>`).

Docs: https://huggingface.co/docs/datasets/loading  https://huggingface.co/docs/tokenizers/quicktour
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hftrain.data import load_prepared, prepare


@dataclass
class PrepareArguments:
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic', 'synthetic-long' (documents of 8-64 reviews), a UTF-8 text file (one document per line), a folder saved with save_to_disk, or a Hub dataset name."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where to write (default: data/<dataset name>)."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "A tokenizer to use (local folder or Hub id); default: train a byte-level BPE on the training split."},
    )
    text_column: str = field(default="text", metadata={"help": "The column that holds the text (saved and Hub datasets)."})
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size of a newly trained tokenizer."})
    max_length: int = field(default=512, metadata={"help": "Documents are cut to this many tokens."})
    test_size: float = field(
        default=0.1, metadata={"help": "Fraction held out for evaluation when the source has no test split."}
    )
    num_examples: int = field(default=6000, metadata={"help": "Size of the synthetic task (train + test)."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic task and of the train/test split."})
    force: bool = field(default=False, metadata={"help": "Rebuild the folder even if it was prepared with other arguments."})


def main() -> None:
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses()
    name = args.dataset if args.dataset.startswith("synthetic") else Path(args.dataset.rstrip("/")).stem.replace("/", "_")
    out = prepare(
        dataset=args.dataset,
        output_dir=args.output_dir or f"data/{name}",
        tokenizer_name=args.tokenizer,
        text_column=args.text_column,
        vocab_size=args.vocab_size,
        max_length=args.max_length,
        test_size=args.test_size,
        num_examples=args.num_examples,
        seed=args.seed,
        force=args.force,
    )
    data = load_prepared(str(out))
    info = json.loads((out / "info.json").read_text())
    print(
        f"prepared {out}: task {data.task}, {len(data.train)} train / {len(data.test)} test examples, "
        f"vocabulary {len(data.tokenizer)}, longest {info['max_length']} tokens"
    )


if __name__ == "__main__":
    main()
