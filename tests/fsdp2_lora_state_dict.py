"""Run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU): which keys PEFT saves from the
full state dict of an FSDP2-sharded LoRA model, with each kind of activation checkpointing.
Writes {variant: [saved keys]} as JSON to the path given; used by tests/test_sharded.py."""

import functools
import json
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


def lora_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=640, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    lora = LoraConfig(r=16, target_modules="all-linear", modules_to_save=["embed_tokens", "lm_head"])
    return get_peft_model(AutoModelForCausalLM.from_config(config), lora)


def saved_keys(variant: str, mesh) -> list[str]:
    model = lora_model()
    if variant == "unsharded":
        return sorted(get_peft_model_state_dict(model))
    if variant == "fsdp_checkpoint_wrapper":  # what accelerate's fsdp_activation_checkpointing applies
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    else:  # TrainingArguments(gradient_checkpointing=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, LlamaDecoderLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # What accelerate.get_state_dict does for FSDP2 under FULL_STATE_DICT, then PEFT's filter in save_pretrained.
    # With cpu_offload the full state dict lands on rank 0 only, which alone saves (as the Trainer does).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sorted(get_peft_model_state_dict(model, state_dict=full)) if dist.get_rank() == 0 else []


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {v: saved_keys(v, mesh) for v in ("unsharded", "model_gradient_checkpointing", "fsdp_checkpoint_wrapper")}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
