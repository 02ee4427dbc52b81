"""DeepSpeed ZeRO-3 with the Trainer: weights, gradients and optimizer state sharded across GPUs.

Teaches: passing a DeepSpeed config to `TrainingArguments(deepspeed=...)`, whose "auto"
values the Trainer fills from its own arguments (batch size, accumulation, clipping, bf16),
and the two rules ZeRO-3 imposes on a script:
- create `TrainingArguments` before the model, so the model is partitioned while it is
  built (`deepspeed.zero.Init`) instead of materialised whole on every GPU first;
- save with `stage3_gather_16bit_weights_on_model_save: true` in the config, so
  `save_model` gathers the shards into one complete model that `from_pretrained` loads.

    accelerate launch --config_file accelerate_config.yaml scripts/trainer/sharded/zero.py --model small
    deepspeed scripts/trainer/sharded/zero.py --model small                  # DeepSpeed's launcher, all GPUs
    deepspeed --num_gpus 2 scripts/trainer/sharded/zero.py --model 1b
    # CPU, two processes over gloo, for testing (DeepSpeed's CPU accelerator):
    deepspeed --num_gpus 2 scripts/trainer/sharded/zero.py --use_cpu
    accelerate launch --multi_gpu --num_processes 2 scripts/trainer/sharded/zero.py --use_cpu
    # (not with ACCELERATE_USE_CPU=true: that makes accelerate choose plain CPU DDP over DeepSpeed)

`--deepspeed` (default deepspeed_config.json) turns `accelerate launch` from DDP into
DeepSpeed by itself: the DDP accelerate config only says how many processes to start.

Docs: https://huggingface.co/docs/transformers/deepspeed
      https://huggingface.co/docs/accelerate/usage_guides/deepspeed
      https://www.deepspeed.ai/docs/config-json/#zero-optimizations-for-fp16-training
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from transformers import set_seed

from hftrain.cli import ScriptArguments
from hftrain.models import load_model
from hftrain.sharding import gather_lm_head_for_liger, start_deepspeed_comm_on_cpu
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


def main() -> None:
    # ZeRO-3 is configured while TrainingArguments is built (in parse_args), before the model exists.
    args, training_args, checkpoint = parse_args(
        ScriptArguments, output_dir="output/trainer/sharded/zero", deepspeed="deepspeed_config.json"
    )
    start_deepspeed_comm_on_cpu(training_args.use_cpu)
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)  # built partitioned
    gather_lm_head_for_liger(model, training_args)  # only with --use_liger_kernel

    trainer = build_trainer(model, training_args, data)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()  # every rank takes part: the shards are gathered into one safetensors file
    write_run_summary(trainer, data, train_result, eval_metrics)


if __name__ == "__main__":
    main()
