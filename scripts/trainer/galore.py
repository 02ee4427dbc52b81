"""GaLore with the Trainer: full-parameter training with Adam's state kept in a low-rank projection.

Teaches Gradient Low-Rank Projection (Zhao et al., 2024) as a `TrainingArguments` optimizer
choice. Every weight learns (unlike LoRA), but for each targeted weight matrix (m x n) the
optimizer projects the gradient onto its top-r singular directions (an SVD, refreshed every
`update_proj_gap` steps), keeps Adam's two moments there (r x n instead of m x n) and
projects the update back, multiplied by `scale`. Three `TrainingArguments` fields:

- `optim`: `galore_adamw` (default), `galore_adamw_8bit` (moments in 8 bits, bitsandbytes),
  `galore_adafactor`, and the `_layerwise` variant of each, which steps every parameter inside
  the backward pass (a hook per parameter) so that only one layer's full gradient exists at a
  time: the largest saving, with the constraints below.
- `optim_target_modules`: which linear layers get the projection; here a regex over module
  names (attention and MLP projections). Embeddings, norms and the output layer get plain AdamW.
- `optim_args`: `rank=..,update_proj_gap=..,scale=..` (the Trainer's defaults: 128, 200, 0.25).

Constraints users hit, which the script refuses up front with one sentence:
- layer-wise variants: one GPU and one process only (no DDP, no DataParallel), and no gradient
  accumulation (each parameter is stepped as soon as its gradient exists). Gradient clipping
  is ineffective with them too (gradients are gone by the time the Trainer would clip).
- the 8-bit variants need CUDA (galore-torch calls `torch.cuda.synchronize()`).
On CPU, `galore_adamw` (and `galore_adamw_layerwise`, `galore_adafactor`) run.

For comparison, the same script runs plain 8-bit AdamW (bitsandbytes: Adam's moments in 8
bits, no projection; it runs on CPU too) with `--optim adamw_bnb_8bit --learning_rate 3e-3`.

    python scripts/trainer/galore.py                                    # tiny, CPU, ~1 min
    CUDA_VISIBLE_DEVICES=0 python scripts/trainer/galore.py --model 1b --optim galore_adamw_8bit_layerwise \\
        --optim_args "rank=128,update_proj_gap=200,scale=0.25" --learning_rate 1e-4 --per_device_train_batch_size 16

Hardware: CPU or one GPU (layer-wise, 8-bit); the non-layer-wise variants also run under
`accelerate launch` (DDP).

Docs: https://huggingface.co/docs/transformers/optimizers#galore
      https://github.com/jiaweizzhao/GaLore
      https://arxiv.org/abs/2403.03507 (GaLore)
"""

from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hftrain.cli import check_output_dir, resolve_checkpoint
from hftrain.data import DEFAULT_DATA_DIR, PadCollator, load_prepared
from hftrain.errors import UserError
from hftrain.metrics import Accuracy
from hftrain.models import load_model
from hftrain.reporting import ThroughputCallback, write_results

# Full-name regex (the Trainer uses re.fullmatch): the q/k/v/o projections and the MLP's gate/up/down.
ATTENTION_AND_MLP = r".*\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


@dataclass
class ScriptArguments:
    model: str = field(default="tiny", metadata={"help": "A preset (tiny, small, 1b), a local checkpoint directory or a Hub id."})
    data_dir: str = field(
        default=DEFAULT_DATA_DIR,
        metadata={"help": "Data made by scripts/prepare_datasets.py (the default is made on first use)."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a run already in --output_dir."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with a Hub model. Off: only enable for code you trust."}
    )


def check_galore(args: TrainingArguments) -> None:
    """The combinations galore-torch and the Trainer cannot run, refused before any model is loaded."""
    optim = args.optim.value
    if optim.startswith("galore") and "8bit" in optim and args.device.type != "cuda":
        raise UserError(f"--optim {optim} needs a CUDA GPU (galore-torch's 8-bit AdamW); on CPU use --optim galore_adamw")
    if optim.endswith("layerwise"):
        if args.world_size > 1 or args.n_gpu > 1:
            raise UserError(
                f"--optim {optim} steps each parameter inside backward and runs in one process on one GPU: "
                "launch with plain python and CUDA_VISIBLE_DEVICES=0, or drop _layerwise to use DDP"
            )
        if args.gradient_accumulation_steps > 1:
            raise UserError(
                f"--optim {optim} cannot accumulate gradients (each parameter is updated as soon as its gradient exists): "
                "drop --gradient_accumulation_steps or use the variant without _layerwise"
            )


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="output/trainer/galore",
        optim="galore_adamw",
        optim_target_modules=ATTENTION_AND_MLP,
        # Rank 16 of the tiny preset's 64 (1/4, as 128 of a 512-wide layer in the paper's smallest model);
        # a short gap because the tiny run is only a few hundred steps long.
        optim_args="rank=16,update_proj_gap=50,scale=0.25",
        num_train_epochs=3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        # The paper's pre-training setting: lr 0.01 with scale 0.25 (the projected update is scaled
        # down, so the rate sits above the 3e-3 that plain AdamW uses on this task).
        learning_rate=1e-2,
        warmup_steps=30,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        logging_steps=10,
        bf16=cuda,
        dataloader_pin_memory=cuda,
        report_to=["tensorboard"],
    )
    args, training_args = parser.parse_args_into_dataclasses()
    training_args.include_num_input_tokens_seen = "non_padding"
    check_galore(training_args)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(
        training_args.output_dir, args.overwrite_output_dir, checkpoint is not None, training_args.process_index == 0
    )

    with training_args.main_process_first():
        data = load_prepared(args.data_dir)
    set_seed(training_args.seed)
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)

    accuracy = Accuracy(data.answer_token_ids)
    throughput = ThroughputCallback(seq_len=data.max_length)
    trainer = Trainer(
        model=model,
        args=training_args,  # the Trainer builds the GaLore optimizer from optim, optim_target_modules, optim_args
        train_dataset=data.train,
        eval_dataset=data.test,
        data_collator=PadCollator(data.tokenizer, pad_to_multiple_of=8 if cuda else None),
        processing_class=data.tokenizer,
        compute_metrics=accuracy.compute_metrics,
        preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
        callbacks=[throughput],
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()

    if trainer.is_world_process_zero():
        write_results(
            training_args.output_dir,
            {
                "eval_accuracy": eval_metrics["eval_accuracy"],
                "eval_loss": eval_metrics["eval_loss"],
                "train_loss": train_result.training_loss,
                "steps": trainer.state.global_step,
                "optim": training_args.optim.value,
                "optim_args": training_args.optim_args,
                **throughput.metrics,
            },
            trainer.state.log_history,
        )


if __name__ == "__main__":
    main()
