"""The flags of every script that trains a LoRA adapter, and the project's one rule for what trains in full beside it."""

from dataclasses import dataclass, field
from typing import Any

from hftrain.cli import ScriptArguments
from hftrain.models import PRESET_MODULES_TO_SAVE, save_preset_base


@dataclass
class LoraArguments:
    """LoRA's flags, as PEFT's LoraConfig names them; which layers get an adapter (target_modules) stays in the script."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank r: the inner size of the update B·A (its size and capacity)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling: the update is multiplied by lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    modules_to_save: str = field(
        default=PRESET_MODULES_TO_SAVE,
        metadata={
            "help": "Comma-separated modules trained in full beside the adapter (saved with it). Default by --model: "
            "embed_tokens,lm_head for a preset (random, they must learn), none for a pretrained checkpoint."
        },
    )


@dataclass
class LoraScriptArguments(LoraArguments, ScriptArguments):
    """A Trainer script's flags (hftrain.cli.ScriptArguments) and LoRA's."""


def lora_flags(args: LoraArguments, model: Any) -> dict[str, Any]:
    """LoraConfig's arguments from LoRA's flags: r, lora_alpha, lora_dropout and `trained_in_full`."""
    return dict(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, **trained_in_full(args.modules_to_save, model)
    )


def trained_in_full(modules_to_save: str | list[str] | None, model: Any) -> dict[str, Any]:
    """LoraConfig's `modules_to_save` (the comma-separated flag, or TRL's list; None for none) and `ensure_weight_tying`. A model whose
    output layer shares the embeddings' weight (tie_word_embeddings: the 1b preset, Llama 3.2, Qwen2.5-0.5B) trains one
    copy for both: without ensure_weight_tying PEFT trains two that drift apart (untied, twice the size, and a warning)."""
    names = modules_to_save.split(",") if isinstance(modules_to_save, str) else modules_to_save or []
    modules = [m for m in names if m] or None
    tied = bool(modules) and bool(getattr(model.config, "tie_word_embeddings", False))
    return {"modules_to_save": modules, "ensure_weight_tying": tied}


def adapter_base(model: str, tokenizer: Any, training_args: Any, **kwargs: Any) -> str:
    """The base an adapter names, in a Trainer run: `hftrain.models.save_preset_base` (a preset's random weights saved
    once, by the main process, in <output_dir>/base; kept when resuming), while the other processes wait."""
    with training_args.main_process_first():
        is_main, resuming = training_args.process_index == 0, training_args.resume_from_checkpoint is not None
        return save_preset_base(model, tokenizer, training_args.output_dir, is_main, reuse=resuming, **kwargs)
