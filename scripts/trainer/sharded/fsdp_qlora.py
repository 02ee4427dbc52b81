"""QLoRA under FSDP2: a 4-bit base model sharded across GPUs, LoRA adapters on every linear layer.

Teaches the three settings that make 4-bit weights shardable and trainable together:
- `bnb_4bit_quant_storage=torch.bfloat16` with the model loaded in `dtype=torch.bfloat16`:
  FSDP shards only float tensors, all of one dtype per shard group, so bitsandbytes packs the
  4-bit weights into bf16 storage and every parameter of a decoder layer is then bf16;
- accelerate's `mixed_precision: "no"` (accelerate_config_fsdp_qlora.yaml): the model already
  computes in bf16, and FSDP must not cast the packed storage;
- gradient checkpointing from TrainingArguments, not FSDP's (which hides the LoRA tensors from the
  save: see fsdp_lora.py); non-reentrant, so the frozen 4-bit inputs need no `requires_grad`
  trick; and the adapter saved after switching to FULL_STATE_DICT.
NF4 with double quantisation keeps the frozen base at ~0.5 byte per parameter.

    accelerate launch --config_file accelerate_config_fsdp_qlora.yaml scripts/trainer/sharded/fsdp_qlora.py --model 1b
    python scripts/evaluate_model.py --model_dir output/trainer/sharded/fsdp_qlora --load_in_4bit

Needs CUDA GPUs: bitsandbytes' 4-bit layers under FSDP are a GPU path.

Docs: https://huggingface.co/docs/peft/accelerate/fsdp#use-peft-qlora-and-fsdp-for-finetuning-large-models-on-multiple-gpus
      https://huggingface.co/docs/bitsandbytes/fsdp_qlora
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, set_seed

from hftrain.errors import UserError
from hftrain.extras import require_extra
from hftrain.lora import LoraScriptArguments, adapter_base, lora_flags
from hftrain.models import count_parameters, load_model
from hftrain.sharding import check_fsdp_layer_classes
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


def main() -> None:
    require_extra("bitsandbytes")  # the 4-bit layers
    if not torch.cuda.is_available():
        raise UserError(
            "fsdp_qlora.py needs CUDA GPUs (4-bit layers under FSDP); on a CPU run scripts/trainer/qlora.py "
            "or scripts/trainer/sharded/fsdp_lora.py instead"
        )
    args, training_args, checkpoint = parse_args(
        LoraScriptArguments,  # --lora_r, --lora_alpha, --lora_dropout, --modules_to_save (hftrain/lora.py)
        output_dir="output/trainer/sharded/fsdp_qlora",
        adapter=True,  # LoRA: the learning rate and modules_to_save follow --model (hftrain.models.model_defaults)
        learning_rate=1e-2,  # for a preset
        bf16=True,  # the 4-bit base computes in bf16 (mixed_precision stays "no" in the config)
        activation_checkpointing=True,  # not FSDP's (see above); non-reentrant: the frozen inputs need no grad
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    base = adapter_base(args.model, data.tokenizer, training_args)  # a preset's random weights saved for the 4-bit load
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantise the scales too: ~0.4 bit per parameter saved
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,  # must equal the dtype below, or FSDP cannot shard the layers together
    )
    model = load_model(
        base, data.tokenizer, dtype=torch.bfloat16, quantization_config=quantization, trust_remote_code=args.trust_remote_code
    )
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
