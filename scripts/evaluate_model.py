"""Evaluate a saved output directory on the prepared test split and print one JSON line.

Takes what the examples save: a full model (`save_pretrained`), a PEFT adapter (loaded on
the base model its adapter_config.json names: a Hub id, or a path relative to the adapter's folder), and with `--load_in_4bit` the model
quantised to 4-bit NF4 on load (bitsandbytes). Uses the Trainer's own evaluation loop with
the same batch size as training, so the numbers match the training run's final eval. Prints
eval_loss (nats per token), perplexity (its exp) and eval_accuracy.

    python scripts/evaluate_model.py --model_dir output/trainer/getting_started
    python scripts/evaluate_model.py --model_dir output/trainer/qlora --load_in_4bit

Docs: https://huggingface.co/docs/peft/package_reference/auto_class
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, HfArgumentParser, Trainer, TrainingArguments

from hftrain.data import DEFAULT_DATA_DIR, PadCollator, load_prepared
from hftrain.errors import UserError
from hftrain.extras import require_extra
from hftrain.metrics import Accuracy
from hftrain.models import PRETRAINED_BATCH_TOKENS, check_tokenizer_matches, load_config, skip_cpu_4bit_repacking
from hftrain.sharing import adapter_base


@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "An output directory holding a full model or a PEFT adapter."})
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "Prepared data whose test split is evaluated."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantise the (base) model to 4-bit NF4 on load."})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Evaluation batch size (default: as many rows as fill 2048 tokens, at most 64: a checkpoint's large "
            "vocabulary makes the logits of 64 long rows tens of GB)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modelling code shipped with a Hub model."})


def main() -> None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    if args.load_in_4bit:
        require_extra("bitsandbytes", "--load_in_4bit")
    path = Path(args.model_dir)
    is_adapter = (path / "adapter_config.json").exists()
    if not is_adapter and not (path / "config.json").exists():
        raise UserError(
            f"--model_dir {args.model_dir} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)"
        )
    data = load_prepared(args.data_dir, trust_remote_code=args.trust_remote_code)
    tokenizer = (
        AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        if (path / "tokenizer_config.json").exists()
        else data.tokenizer
    )
    if tokenizer.get_vocab() != data.tokenizer.get_vocab():
        raise UserError(f"{args.model_dir} was trained with another tokenizer than {args.data_dir}; pass the matching --data_dir")

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    kwargs = {}
    if args.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    base = adapter_base(str(path)) if is_adapter else str(path)  # an adapter names its base relative to its folder
    if not is_adapter:
        check_tokenizer_matches(str(path), load_config(str(path), args.trust_remote_code), data.tokenizer, args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, trust_remote_code=args.trust_remote_code, use_safetensors=True, use_kernels=False, **kwargs
    )
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    if args.load_in_4bit:
        skip_cpu_4bit_repacking(model)

    accuracy = Accuracy(data.answer_token_ids)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=tmp,
                per_device_eval_batch_size=args.batch_size
                if args.batch_size is not None
                else min(64, max(1, PRETRAINED_BATCH_TOKENS["eval"] // data.max_length)),
                report_to=[],
                bf16=torch.cuda.is_available() and not args.load_in_4bit,
            ),
            eval_dataset=data.test,
            data_collator=PadCollator(data.tokenizer),
            compute_metrics=accuracy.compute_metrics,
            preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
        )
        metrics = trainer.evaluate()
    print(
        json.dumps(
            {
                "model_dir": args.model_dir,
                "adapter": is_adapter,
                "load_in_4bit": args.load_in_4bit,
                "eval_accuracy": metrics["eval_accuracy"],
                "eval_loss": metrics["eval_loss"],
                "perplexity": metrics["eval_perplexity"],  # exp of the loss per target token (hftrain.metrics)
                "num_examples": len(data.test),
            }
        )
    )


if __name__ == "__main__":
    main()
