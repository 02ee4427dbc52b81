"""LoRA under FSDP2: the frozen base model is sharded across GPUs, the adapter trains.

Teaches: PEFT's `get_peft_model` before the Trainer, with FSDP from the accelerate config
(accelerate_config_fsdp_lora.yaml). FSDP2 shards frozen and trainable parameters side by side,
so nothing special is needed to train; saving is where adapters go wrong, twice over:
- under FSDP each rank holds a slice of every LoRA matrix, and a sharded save writes slices:
  the script switches to FULL_STATE_DICT first, so rank 0 gathers whole tensors;
- FSDP's activation checkpointing wraps each decoder layer in a module that renames it, and
  PEFT then finds no LoRA tensor in the gathered state dict: the adapter file would hold only
  the `modules_to_save` copies. So the config leaves it off and the script checkpoints with
  the model's own, `activation_checkpointing=True` (tests/test_sharded.py shows both on CPU).
And loading: the config turns off `fsdp_cpu_ram_efficient_loading`, which moves the model to
the meta device and re-ties its embeddings; a tied model (the `1b` preset, Llama 3.2) whose
embeddings are in `modules_to_save` then fails with "KeyError: attribute 'weight' already
exists" (accelerate 1.15, PEFT 0.21; tests/test_sharded.py reproduces it on CPU).
The adapter then reloads with `PeftModel.from_pretrained` on its base (for a preset, saved
beside it in `base/`).

    accelerate launch --config_file accelerate_config_fsdp_lora.yaml scripts/trainer/sharded/fsdp_lora.py --model 1b
    python scripts/trainer/sharded/fsdp_lora.py      # one process, no sharding: the same code path on CPU
    python scripts/evaluate_model.py --model_dir output/trainer/sharded/fsdp_lora

Docs: https://huggingface.co/docs/peft/accelerate/fsdp
      https://huggingface.co/docs/peft/developer_guides/lora
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from peft import LoraConfig, get_peft_model
from transformers import set_seed

from hftrain.lora import LoraScriptArguments, adapter_base, lora_flags
from hftrain.models import count_parameters, load_model
from hftrain.sharding import check_fsdp_layer_classes
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


def main() -> None:
    args, training_args, checkpoint = parse_args(
        LoraScriptArguments,  # --lora_r, --lora_alpha, --lora_dropout, --modules_to_save (hftrain/lora.py)
        output_dir="output/trainer/sharded/fsdp_lora",
        adapter=True,  # LoRA: the learning rate and modules_to_save follow --model (hftrain.models.model_defaults)
        learning_rate=1e-2,  # for a preset
        activation_checkpointing=True,  # not FSDP's (see above); non-reentrant: the frozen inputs need no grad
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    base = adapter_base(args.model, data.tokenizer, training_args)  # a preset's random weights saved: the adapter's base
    model = load_model(base, data.tokenizer, trust_remote_code=args.trust_remote_code)
    check_fsdp_layer_classes(model)

    # LoRA on every projection in attention and MLP (not lm_head). A preset's random embeddings and output layer must
    # learn too, a pretrained base's stay frozen (modules_to_save, default by --model, tied as the model ties them).
    lora = LoraConfig(**lora_flags(args, model), target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    trainer = build_trainer(model, training_args, data)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    if trainer.is_fsdp_enabled:  # gather whole tensors, or only rank 0's slice of each LoRA tensor is saved
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()  # adapter_model.safetensors + adapter_config.json naming the base
    write_run_summary(
        trainer, data, train_result, eval_metrics, trainable_parameters=count_parameters(model, trainable_only=True)
    )


if __name__ == "__main__":
    main()
