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

from transformers import HfArgumentParser

from hftrain.data import PrepareArguments, load_prepared, prepare


def main() -> None:
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses()
    out = prepare(args)
    data = load_prepared(str(out), trust_remote_code=args.trust_remote_code)
    info = json.loads((out / "info.json").read_text())
    unit = f"blocks of {info['block_size']} tokens" if "block_size" in info else "examples"
    print(
        f"prepared {out}: task {data.task}, {len(data.train)} train / {len(data.test)} test {unit}, "
        f"vocabulary {len(data.tokenizer)}, longest {info['max_length']} tokens"
    )


if __name__ == "__main__":
    main()
