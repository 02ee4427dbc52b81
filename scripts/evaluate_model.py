"""Evaluate a model on held-out text and print one JSON line: eval loss, perplexity and accuracy.

Takes any model: a training output or checkpoint folder (`save_pretrained`), a pretrained checkpoint (a folder or a
Hub id), a merged model, a PEFT adapter (loaded on the base model its adapter_config.json names: a Hub id, or a path
relative to the adapter's folder), and with `--load_in_4bit` any of them quantised to 4-bit NF4 on load
(bitsandbytes). Two kinds of held-out text:

- `--eval_file my_text.txt` (or a .json/.jsonl/.csv/.parquet file with a `--text_column`): your own text, tokenized
  with the model's own tokenizer and cut into blocks as `prepare_datasets.py` cuts a corpus (EOS between
  documents), all of it held out. Run it on the base checkpoint and on the fine-tuned output for before and after.
- `--data_dir` (default data/synthetic): the test split of prepared data, with the training runs' batch size and
  loss, so the numbers match the run's final evaluation.

eval_loss is the mean of the batches' losses (as the Trainer reports it), perplexity the exp of the loss per
target token, eval_accuracy that of the rating (the rating task) or of the next token (text).

    python scripts/evaluate_model.py --model_dir output/trainer/getting_started
    python scripts/evaluate_model.py --model_dir $CKPT --eval_file my_text.txt                    # before
    python scripts/evaluate_model.py --model_dir output/lora/custom_loop --eval_file my_text.txt  # after
    python scripts/evaluate_model.py --model_dir output/trainer/qlora --load_in_4bit

Docs: https://huggingface.co/docs/peft/package_reference/auto_class
      https://huggingface.co/docs/transformers/perplexity
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BitsAndBytesConfig, EvalPrediction, HfArgumentParser

from hftrain.corpus import DEFAULT_BLOCK_SIZE
from hftrain.data import DEFAULT_DATA_DIR, PadCollator, load_prepared, text_blocks
from hftrain.errors import UserError
from hftrain.extras import require_extra
from hftrain.metrics import Accuracy
from hftrain.models import (
    PRETRAINED_BATCH_TOKENS,
    check_vocabulary,
    load_config,
    load_model,
    load_tokenizer,
    skip_cpu_4bit_repacking,
)
from hftrain.sharing import adapter_base


@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "A full model, a PEFT adapter, a merged model, a checkpoint folder or a Hub id."})
    eval_file: str | None = field(
        default=None,
        metadata={"help": "Your own text to evaluate on: a .txt file, or .json/.jsonl/.csv/.parquet with --text_column."},
    )
    text_column: str = field(default="text", metadata={"help": "With --eval_file: the column holding the text."})
    block_size: int | None = field(
        default=None, metadata={"help": "With --eval_file: tokens per block (default: min(1024, the model's positions))."}
    )
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "Prepared data whose test split is evaluated."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantise the (base) model to 4-bit NF4 on load."})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Evaluation batch size (default: 64 rating examples, as in training; blocks of text: as many as fill "
            "2048 tokens, since a checkpoint's large vocabulary makes the logits of 64 long rows tens of GB)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modelling code shipped with a Hub model."})


def main() -> None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size is {args.batch_size}; it must be at least 1")
    if args.load_in_4bit:
        require_extra("bitsandbytes", "--load_in_4bit")
    is_adapter = Path(args.model_dir, "adapter_config.json").exists()
    base = adapter_base(args.model_dir) if is_adapter else args.model_dir
    config = load_config(base, args.trust_remote_code)  # a missing folder, a broken config, a Hub id offline: one sentence

    if args.eval_file is not None:  # the model's own tokenizer (the adapter's folder's, else its base's)
        has_tokenizer = Path(args.model_dir, "tokenizer_config.json").exists()
        tokenizer = load_tokenizer(args.model_dir if has_tokenizer else base, args.trust_remote_code)
        check_vocabulary(args.model_dir, config, tokenizer)
        positions = getattr(config, "max_position_embeddings", None) or DEFAULT_BLOCK_SIZE
        block_size = args.block_size or min(DEFAULT_BLOCK_SIZE, positions)
        if not 2 <= block_size <= positions:
            raise UserError(f"--block_size {block_size} must be from 2 to the model's {positions} positions")
        eval_set, answer_ids, rows = text_blocks(args.eval_file, tokenizer, args.text_column, block_size), [], block_size
    else:
        data = load_prepared(args.data_dir, trust_remote_code=args.trust_remote_code)
        tokenizer = data.tokenizer
        own = Path(args.model_dir, "tokenizer_config.json").exists() and load_tokenizer(args.model_dir, args.trust_remote_code)
        if own and own.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"{args.model_dir} was trained with another tokenizer than {args.data_dir}; pass the matching --data_dir, "
                "or your text as --eval_file"
            )
        eval_set, answer_ids, rows = data.test, data.answer_token_ids, data.max_length
    # 64 short rating examples, as the training scripts evaluate them (so eval_loss matches theirs); blocks of text: as
    # many as fill 2048 tokens, since a checkpoint's large vocabulary makes the logits of 64 long rows tens of GB.
    batch_size = 64 if answer_ids else max(1, PRETRAINED_BATCH_TOKENS["eval"] // rows)

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = {}
    if args.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    # The same checks as training: safetensors weights there, a vocabulary that fits, the real cause in one sentence.
    model = load_model(base, tokenizer, dtype=dtype, trust_remote_code=args.trust_remote_code, **kwargs)
    if is_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, args.model_dir)
        except Exception as e:
            raise UserError(
                f"could not load the adapter in {args.model_dir} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            )
    if args.load_in_4bit:
        skip_cpu_4bit_repacking(model)  # the 4-bit layers compute as they did in training (qlora.py)
    elif cuda:
        model.to("cuda")  # a 4-bit model is placed on the GPU as it is quantised
    model.eval()

    # A plain evaluation loop, not the Trainer's: the Trainer refuses a 4-bit model without adapters, since it
    # checks every model for training; evaluating needs none of that.
    accuracy = Accuracy(answer_ids)
    loader = DataLoader(eval_set, batch_size=args.batch_size or batch_size, collate_fn=PadCollator(tokenizer))
    device = next(model.parameters()).device
    loss_sum, correct, totals = 0.0, [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating"):
            labels = batch["labels"].to(device)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), labels=labels)
            loss_sum += out.loss.item() * len(labels)  # the Trainer's eval_loss: each batch's mean loss, weighed by its rows
            right, total = accuracy.preprocess_logits_for_metrics(out.logits, labels)
            correct.append(right.flatten().cpu())
            totals.append(total.cpu())
    metrics = accuracy.compute_metrics(EvalPrediction((torch.cat(correct).numpy(), torch.cat(totals).numpy()), None))
    print(
        json.dumps(
            {
                "model_dir": args.model_dir,
                "adapter": is_adapter,
                "load_in_4bit": args.load_in_4bit,
                "eval_file": args.eval_file,
                "eval_accuracy": metrics["accuracy"],
                "eval_loss": loss_sum / len(eval_set),
                "perplexity": metrics["perplexity"],  # exp of the loss per target token (hftrain.metrics)
                "num_examples": len(eval_set),
                "num_tokens": int(torch.cat(totals)[:, 1].sum()),
            }
        )
    )


if __name__ == "__main__":
    main()
