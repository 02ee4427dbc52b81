"""Checks for the sharded examples' configs, so a wrong file stops the run with one sentence."""

import json
import os
from pathlib import Path
from typing import Any

from hftrain.errors import UserError


def check_deepspeed_config(path: str | None) -> dict[str, Any] | None:
    """The DeepSpeed config must exist, be valid JSON and describe ZeRO-3 with full-model saving."""
    if not path:
        return None
    if not Path(path).is_file():
        raise UserError(
            f"--deepspeed {path} does not exist; pass the path of a DeepSpeed JSON config (e.g. deepspeed_config.json)"
        )
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--deepspeed {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file")
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UserError(
            f"{path} uses ZeRO-3 without stage3_gather_16bit_weights_on_model_save; set it to true, "
            "or the saved model holds only empty placeholders"
        )
    return config


def check_fsdp_layer_classes(model: Any) -> None:
    """Under `accelerate launch` with an FSDP config, the layer classes to wrap must exist in the model."""
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or not names:
        return
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names.split(",") if n.strip() and n.strip() not in present]
    if missing:
        layers = ", ".join(getattr(model, "_no_split_modules", None) or []) or "its decoder layer class"
        raise UserError(
            f"the FSDP config wraps {', '.join(missing)}, which this model does not have; set "
            f"fsdp_transformer_layer_cls_to_wrap to {layers}, or delete the key to use the model's own _no_split_modules"
        )


def start_deepspeed_comm_on_cpu(use_cpu: bool) -> None:
    """On CPU, accelerate starts torch.distributed (gloo) but not DeepSpeed's own comm layer, which
    ZeRO-3's partitioned model init needs to know the world size. GPUs need nothing: there
    accelerate starts DeepSpeed itself."""
    if use_cpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def gather_lm_head_for_liger(model: Any, training_args: Any) -> None:
    """Under ZeRO-3 with `--use_liger_kernel`: Liger's fused linear cross-entropy reads `lm_head.weight`
    itself, outside `lm_head`'s forward, where ZeRO-3 would hand it an empty partition. Registered as an
    external parameter of the model, the weight is gathered for the model's whole forward."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if training_args.use_liger_kernel and is_deepspeed_zero3_enabled():
        from deepspeed.runtime.zero import register_external_parameter

        register_external_parameter(model, model.get_output_embeddings().weight)
