"""4-bit loading for QLoRA: the NF4 config, a base checkpoint for the random presets, the CPU trap.

QLoRA quantizes a *pretrained* base while loading it (`from_pretrained(...,
quantization_config=...)`). The presets have random weights and no checkpoint, so
`hftrain.models.save_preset_base()` builds the preset once and saves it; the 4-bit model is then loaded from
there exactly as a real checkpoint would be, and the adapter's `base_model_name_or_path`
points at a folder that `scripts/evaluate_model.py --load_in_4bit` can reload.
"""

from typing import Any

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from hftrain.errors import UserError
from hftrain.models import load_model, skip_cpu_4bit_repacking

# Devices bitsandbytes 0.48+ has 4-bit kernels for (CPU since 0.48, with AVX2/AVX512).
BNB_4BIT_DEVICES = ("cuda", "cpu", "xpu")


def nf4_config(compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None) -> BitsAndBytesConfig:
    """The QLoRA paper's recipe: NormalFloat4 weights, the quantization scales quantized again
    ("double quantization", ~0.4 bits per parameter saved), matmuls in `compute_dtype`. Under FSDP the
    packed weights must be stored in the dtype the model is loaded in (`quant_storage`), so FSDP can
    shard them with the other parameters; otherwise bitsandbytes' default (uint8)."""
    storage = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **storage,
    )


def check_4bit_device(device: torch.device) -> None:
    if device.type not in BNB_4BIT_DEVICES:
        raise UserError(
            f"bitsandbytes has no 4-bit kernels for the '{device.type}' device; run on a CUDA GPU or on the CPU (--use_cpu)"
        )


def load_4bit(
    model: str,
    tokenizer: PreTrainedTokenizerBase,
    compute_dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    quantization_config: BitsAndBytesConfig | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """The checkpoint quantized to 4-bit while it loads (`quantization_config`, by default `nf4_config(compute_dtype)`),
    placed whole on `device` (one per process)."""
    check_4bit_device(device)
    quantized = load_model(
        model,
        tokenizer,
        dtype=compute_dtype,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization_config or nf4_config(compute_dtype),
        device_map={"": str(device)},
        **kwargs,
    )
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights during the first no-grad
    # eval forward; afterwards the LoRA layers below them get zero gradients (a warning only),
    # so training after the first evaluation would silently stop. See skip_cpu_4bit_repacking.
    skip_cpu_4bit_repacking(quantized)
    return quantized


def has_float8_tensor_cores() -> bool:
    """float8 matmuls (torch._scaled_mm) need compute capability 8.9 or newer: H100, H200, L40S, RTX 4090, B200."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def float8_training(model: torch.nn.Module, emulate: bool = False) -> torch.nn.Module:
    """Swap the decoder's nn.Linear layers for torchao's Float8Linear, in place: each matmul of the forward and
    backward runs in float8 (e4m3 inputs and weights, e5m2 gradients), with one dynamic scale per tensor
    ("tensorwise", torchao's fastest recipe). The weights, the optimizer and the checkpoints stay exactly as
    they were: a saved model is a plain one. Speed needs torch.compile around the layers, which fuses the
    scaling casts into the neighbouring kernels; `emulate=True` runs the same code without float8 hardware
    (tests only). The output layer keeps bf16, as torchao and torchtitan recommend for accuracy."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def wanted(module: torch.nn.Module, fqn: str) -> bool:  # float8 GEMMs need both dimensions divisible by 16
        return (
            isinstance(module, torch.nn.Linear)
            and "lm_head" not in fqn
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    return convert_to_float8_training(model, config=Float8LinearConfig(emulate=emulate), module_filter_fn=wanted)
