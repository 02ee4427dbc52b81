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

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from transformers import TrainingArguments, set_seed

from hftrain.cli import ScriptArguments
from hftrain.errors import UserError
from hftrain.models import load_model
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary

# Full-name regex (the Trainer uses re.fullmatch): the q/k/v/o projections and the MLP's gate/up/down.
ATTENTION_AND_MLP = r".*\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def check_galore(args: ScriptArguments, training_args: TrainingArguments) -> None:
    """The combinations galore-torch and the Trainer cannot run, refused before any model is loaded."""
    optim = training_args.optim.value
    if optim.startswith("galore") and "8bit" in optim and training_args.device.type != "cuda":
        raise UserError(f"--optim {optim} needs a CUDA GPU (galore-torch's 8-bit AdamW); on CPU use --optim galore_adamw")
    if optim.endswith("layerwise"):
        if training_args.world_size > 1 or training_args.n_gpu > 1:
            raise UserError(
                f"--optim {optim} steps each parameter inside backward and runs in one process on one GPU: "
                "launch with plain python and CUDA_VISIBLE_DEVICES=0, or drop _layerwise to use DDP"
            )
        if training_args.gradient_accumulation_steps > 1:
            raise UserError(
                f"--optim {optim} cannot accumulate gradients (each parameter is updated as soon as its gradient exists): "
                "drop --gradient_accumulation_steps or use the variant without _layerwise"
            )


def main() -> None:
    args, training_args, checkpoint = parse_args(
        ScriptArguments,
        check=check_galore,
        output_dir="output/trainer/galore",
        optim="galore_adamw",
        optim_target_modules=ATTENTION_AND_MLP,
        # Rank 16 of the tiny preset's 64 (1/4, as 128 of a 512-wide layer in the paper's smallest model);
        # a short gap because the tiny run is only a few hundred steps long.
        optim_args="rank=16,update_proj_gap=50,scale=0.25",
        # The paper's pre-training setting: lr 0.01 with scale 0.25 (the projected update is scaled
        # down, so the rate sits above the 3e-3 that plain AdamW uses on this task).
        learning_rate=1e-2,
    )
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)

    # The Trainer builds the GaLore optimizer from optim, optim_target_modules and optim_args.
    trainer = build_trainer(model, training_args, data)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()
    write_run_summary(
        trainer, data, train_result, eval_metrics, optim=training_args.optim.value, optim_args=training_args.optim_args
    )


if __name__ == "__main__":
    main()
