"""FlashAttention-2 with padding-free batches: the Trainer on concatenated documents, no padding.

Teaches `attn_implementation="flash_attention_2"` (the flash-attn package) and why it pairs with
padding-free batches. A padded batch spends compute on pad tokens in every layer (the MLPs and
projections too, not only attention); FA2's varlen kernel instead takes the documents of a batch
concatenated into one row plus their boundaries (`cu_seqlens`), so every FLOP goes to a real token
and no T x T mask is ever built. `DataCollatorWithFlattening` (wrapped in
`hftrain.packing.PaddingFreeCollator`) makes such batches: `position_ids` restart at 0 for every
document, and the first token of each document is not a target, so the loss equals the padded
batch's loss up to float rounding (tests/test_attention.py checks it).

    pip install flash-attn --no-build-isolation                     # CUDA GPU (Ampere or newer), compiles ~15 min
    CUDA_VISIBLE_DEVICES=0 python scripts/sdpa/flash_attention.py --model small   # one GPU, bf16
    accelerate launch --config_file accelerate_config.yaml \\
        scripts/sdpa/flash_attention.py --model small               # every GPU (DDP); DataParallel
                                                                    # cannot split a one-row batch
    python scripts/sdpa/flash_attention.py --attn_implementation sdpa   # no flash-attn (CPU too): same batches
    python scripts/sdpa/flash_attention.py --padding_free false     # padded batches, to compare
    CUDA_VISIBLE_DEVICES=0 python scripts/sdpa/flash_attention.py --model llama-3.2-1b --data_dir data/synthetic-long \
        --pack_rows 2048 --compile_layers --fused_loss --per_device_train_batch_size 16   # the benchmark's bf16 recipe
    ... --pack_rows 2048 --compile_layers --fused_loss --fp8 --per_device_train_batch_size 16   # float8 (H100/H200)

Those flags build a `hftrain.recipe.Recipe`; the benchmark's recipe cases launch this script with them
(tests/test_benchmark.py checks the flags and the settings they hand the Trainer).

With sdpa or eager the same packed batches work too: transformers turns the restarting
`position_ids` into a block-diagonal causal mask (see hftrain/packing.py for when it does not).
That mask is T x T for the whole packed row, so padding-free pays off most with FA2.
Evaluation uses padded batches, one document per row, as the accuracy hooks expect.

Docs: https://huggingface.co/docs/transformers/perf_infer_gpu_one#flashattention
      https://huggingface.co/blog/packing-with-FA2
      https://github.com/Dao-AILab/flash-attention
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import is_flash_attn_2_available

from hftrain.cli import ScriptArguments
from hftrain.data import PadCollator
from hftrain.errors import UserError
from hftrain.models import load_model
from hftrain.packing import PaddingFreeCollator, packed_rows
from hftrain.quantization import float8_training, has_float8_tensor_cores
from hftrain.recipe import Recipe
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


def main() -> None:
    args, training_args, checkpoint = parse_args(
        AttentionArguments,
        check=check_flash_attention,
        output_dir="output/sdpa/flash_attention",
        # Documents per batch: one packed row of ~32 x 40 tokens. bf16 on CUDA (the project default): FA2
        # computes in bf16/fp16 only; the weights stay fp32 and autocast feeds it bf16.
        per_device_train_batch_size=32,
    )
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    speed = recipe(args, training_args)  # the benchmark's recipe settings (hftrain.recipe), from the flags
    # FA2 warns that these fp32 weights are not bf16: expected, the Trainer's bf16 autocast hands it bf16 tensors.
    model = load_model(
        args.model, data.tokenizer, attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code
    )

    if speed.fp8:  # before compiling, so the float8 casts are compiled with the layers
        float8_training(model)
    if speed.compile_layers:  # the layers share their code, so they share one compiled graph
        for layer in model.get_decoder().layers:
            layer.compile()

    padded = PadCollator(data.tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    train_collator: Any = PaddingFreeCollator(args.attn_implementation) if args.padding_free else padded
    if args.pack_rows:  # rows of whole documents; compiled layers get one fixed length, so they compile once
        data.train = packed_rows(data.train, args.pack_rows)
        train_collator = speed.collator(data.tokenizer.pad_token_id)
    trainer = build_trainer(
        model, training_args, data, trainer_class=PaddedEvalTrainer, data_collator=train_collator, eval_collator=padded
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()
    write_run_summary(
        trainer, data, train_result, eval_metrics, attn_implementation=args.attn_implementation, padding_free=args.padding_free
    )


@dataclass
class AttentionArguments(ScriptArguments):
    attn_implementation: str = field(
        default="flash_attention_2",
        metadata={
            "help": "flash_attention_2 (needs the flash-attn package and a CUDA GPU), or sdpa / eager / flex_attention to "
            "run the same padding-free batches without it (CPU too).",
            "choices": ["flash_attention_2", "sdpa", "eager", "flex_attention"],
        },
    )
    padding_free: bool = field(
        default=True, metadata={"help": "Concatenate each batch's documents into one row (false: pad them to a rectangle)."}
    )
    pack_rows: int = field(
        default=0,
        metadata={
            "help": "Pack whole documents into rows of at most this many tokens (e.g. 2048) first; the batch size then "
            "counts rows, so every step carries about batch x pack_rows tokens whatever the document lengths. 0: off."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "Compile each decoder layer with torch.compile (regional compilation: one graph, compiled once)."},
    )
    fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Liger's fused linear + cross-entropy alone (needs liger-kernel and a CUDA GPU): the logits "
            "(tokens x vocabulary) are never stored whole, which saves tens of GiB with a 128k vocabulary."
        },
    )
    fp8: bool = field(
        default=False,
        metadata={
            "help": "Run the decoder's matmuls in float8 (torchao, tensorwise scales; needs an H100/H200-class GPU). "
            "Pair it with --compile_layers, which fuses the float8 casts; the saved model is a plain bf16/fp32 one."
        },
    )


def recipe(args: AttentionArguments, training_args: TrainingArguments) -> Recipe:
    """The flags as a `Recipe`; its Trainer settings (micro-batch in rows, fused loss,
    `remove_unused_columns=False` for the packed rows' `documents`) are set on `training_args`."""
    r = Recipe(
        attn_implementation=args.attn_implementation,
        pack_rows=args.pack_rows,
        rows=training_args.per_device_train_batch_size,
        compile_layers=args.compile_layers,
        fp8=args.fp8,
        fused_loss=args.fused_loss,
    )
    every_liger_kernel = training_args.use_liger_kernel  # --use_liger_kernel: all of Liger's kernels, as asked
    for key, value in r.training_arguments().items():
        # the optimizer stays the user's choice (its default is the recipe's fused AdamW); only packed rows
        # carry `documents`, which the Trainer must not drop as an unused column
        if key == "optim" or (key == "remove_unused_columns" and not args.pack_rows):
            continue
        if not (every_liger_kernel and "liger" in key):
            setattr(training_args, key, value)
    return r


class PaddedEvalTrainer(Trainer):
    """Trains on the given collator's batches; evaluates on padded ones (the accuracy hooks score one document per row)."""

    data_collator: Any

    def __init__(self, *args: Any, eval_collator: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


def check_flash_attention(args: AttentionArguments, training_args: TrainingArguments) -> None:
    """FA2 runs only on CUDA GPUs with the flash-attn package; say so before anything is loaded."""
    if args.pack_rows and not args.padding_free:
        raise UserError("--pack_rows builds padding-free batches; drop --padding_free false or --pack_rows")
    if args.padding_free and training_args.n_gpu > 1:
        raise UserError(
            f"a padding-free batch is one row, which DataParallel cannot split over {training_args.n_gpu} GPUs; run one "
            "process per GPU with `accelerate launch --config_file accelerate_config.yaml`, or pick one GPU with CUDA_VISIBLE_DEVICES=0"
        )
    if args.fp8 and not has_float8_tensor_cores():
        gpu = (
            f"{torch.cuda.get_device_name()} has compute capability {torch.cuda.get_device_capability()}"
            if torch.cuda.is_available()
            else "this machine has no CUDA GPU"
        )
        raise UserError(
            f"--fp8 needs float8 tensor cores (compute capability 8.9+: H100, H200, L40S, RTX 4090) and {gpu}; drop --fp8"
        )
    if args.fused_loss and not (torch.cuda.is_available() and find_spec("liger_kernel")):
        raise UserError(
            '--fused_loss needs liger-kernel and a CUDA GPU: pip install -e ".[liger]" on a CUDA machine, or drop --fused_loss'
        )
    if args.fp8 and find_spec("torchao") is None:
        raise UserError('--fp8 needs torchao: pip install -e ".[fp8]" (or pip install torchao)')
    if args.attn_implementation != "flash_attention_2" or (torch.cuda.is_available() and is_flash_attn_2_available()):
        return
    missing = "a CUDA GPU" if not torch.cuda.is_available() else "the flash-attn package (2.3.3 or newer)"
    raise UserError(
        f"flash_attention_2 needs {missing}: on a CUDA machine install it with `pip install flash-attn --no-build-isolation` "
        '(or `pip install -e ".[flash-attn]" --no-build-isolation`), or pass --attn_implementation sdpa to train without it'
    )


if __name__ == "__main__":
    main()
