"""FSDP2 full fine-tuning with the Trainer: each GPU holds 1/N of the weights, gradients and
optimizer state, and gathers a layer's weights only while that layer runs.

Teaches: FSDP is switched on by the accelerate config, not by the script
(accelerate_config_fsdp.yaml: FSDP2, one shard group per decoder layer taken from the model's
own `_no_split_modules`, activation checkpointing, CPU-RAM-efficient loading). What the script
must do itself is save correctly: checkpoints stay sharded (SHARDED_STATE_DICT, fast to write,
resumable), and before the final `save_model` the state-dict type switches to
FULL_STATE_DICT so rank 0 writes one complete safetensors model that `from_pretrained` loads.

    accelerate launch --config_file accelerate_config_fsdp.yaml scripts/trainer/sharded/fsdp.py --model 1b
    python scripts/trainer/sharded/fsdp.py           # one process, no sharding: the same code path on CPU

Docs: https://huggingface.co/docs/accelerate/usage_guides/fsdp
      https://huggingface.co/docs/transformers/fsdp
      https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from transformers import set_seed

from hftrain.cli import ScriptArguments
from hftrain.models import load_model
from hftrain.sharding import check_fsdp_layer_classes
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


def main() -> None:
    args, training_args, checkpoint = parse_args(ScriptArguments, output_dir="output/trainer/sharded/fsdp")
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)
    check_fsdp_layer_classes(model)  # a config naming a layer this model lacks fails here, in one sentence

    trainer = build_trainer(model, training_args, data)  # accelerate shards the model inside the Trainer
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final model is gathered whole on rank 0
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    write_run_summary(trainer, data, train_result, eval_metrics, fsdp=bool(trainer.is_fsdp_enabled))


if __name__ == "__main__":
    main()
