"""Model presets built from a config with random weights, and loading of real checkpoints.

`--model` takes a preset name (`tiny`, `small`, `1b`, or a real model's exact shape: `llama-3.2-1b`,
`qwen2.5-0.5b`), a local checkpoint directory or a Hub id; the last two go through the library's own
`from_pretrained`.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from hftrain.errors import UserError, cause_of

SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def _shape(sizes: tuple[int, int, int, int, int], positions: int, **config: Any) -> dict[str, Any]:
    return dict(zip(SHAPE, sizes, strict=True), max_position_embeddings=positions, **config)


# Llama architecture throughout (RMSNorm, SwiGLU, RoPE, grouped-query attention). Each row: hidden size, MLP size,
# layers, attention heads, key/value heads, then the positions and what else differs from Llama's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M parameters: learns the rating task on a laptop CPU in seconds.
    "tiny": _shape((64, 256, 2, 4, 2), 1024),
    # ~100M parameters (without embeddings), GPT-2-small sized: one GPU.
    "small": _shape((768, 3072, 12, 12, 4), 4096),
    # Llama-3.2-1B shape (~1B parameters with a 32k vocabulary): the benchmarks' model.
    "1b": _shape(
        (2048, 8192, 16, 32, 8),
        8192,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # The exact shape of meta-llama/Llama-3.2-1B (its config.json), random weights: 1.24B parameters, a
    # fifth of them the 128,256 x 2048 tied embedding / output layer. Its vocabulary is kept (PRESET_VOCAB).
    "llama-3.2-1b": _shape(
        (2048, 8192, 16, 32, 8),
        131072,
        head_dim=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # The shape of Qwen/Qwen2.5-0.5B (Qwen2 architecture: biases on q/k/v), random weights: 0.49B parameters,
    # 0.14B of them the 151,936-token tied embedding / output layer.
    "qwen2.5-0.5b": _shape(
        (896, 4864, 24, 14, 2),
        32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}
# Presets of real models keep their own vocabulary and architecture; the others take the data's
# tokenizer's vocabulary and Llama's architecture. Token ids of a smaller tokenizer are valid rows of
# a larger embedding, so the synthetic data trains these shapes as it is.
PRESET_VOCAB = {"llama-3.2-1b": 128256, "qwen2.5-0.5b": 151936}
PRESET_TYPE = {"qwen2.5-0.5b": "qwen2"}


def is_local_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~")) or os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or Path(name).exists()
    )


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The preset's config: a real model's own vocabulary, else the vocabulary of `tokenizer` rounded up to a
    multiple of 64 for fast matmuls."""
    vocab = PRESET_VOCAB.get(name) or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise UserError(f"the preset {name} has {vocab} embeddings but the data's tokenizer has {len(tokenizer)} tokens")
    return AutoConfig.for_model(
        PRESET_TYPE.get(name, "llama"),
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[name],
    )


def check_checkpoint_format(model: str) -> None:
    """Refuse, with what to do instead, the checkpoints this project does not load: a GGUF file (llama.cpp's format)
    and pickled weights without safetensors (unpickling a file can run any code in it)."""
    path = Path(model).expanduser()
    if not is_local_path(model) or not path.exists():
        return
    ggufs = [path] if path.is_file() and path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs and not (path.is_dir() and (path / "config.json").exists()):
        folder, name = (ggufs[0].parent, ggufs[0].name)
        raise UserError(
            f"--model {model} is a GGUF file, which training does not take; convert it once to a checkpoint folder: "
            f"AutoModelForCausalLM.from_pretrained('{folder}', gguf_file='{name}').save_pretrained('<dir>') and the same "
            "with AutoTokenizer, then pass --model <dir>"
        )
    if path.is_dir() and any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
        raise UserError(
            f"--model {model} holds only pickled weights ({next(path.glob('*.bin')).name}), which this project does not "
            "load (unpickling can run code); re-save it as safetensors where you trust the file: "
            f"AutoModelForCausalLM.from_pretrained('{model}').save_pretrained('<dir>') (and the tokenizer), then pass --model <dir>"
        )


def check_remote_code(model: str, trust_remote_code: bool, flag: str = "--model") -> None:
    """Refuse a local checkpoint or tokenizer folder that ships its own Python code (an `auto_map` in its config.json or
    tokenizer_config.json) unless --trust_remote_code: transformers would otherwise ask on a terminal, and one "y" runs it.
    Every load also passes trust_remote_code explicitly, so a Hub id's code never runs without the flag either."""
    folder = Path(model).expanduser()
    if trust_remote_code or not is_local_path(model) or not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            raise UserError(
                f"{flag} {model} ships its own Python code (auto_map in {name}), which runs only with --trust_remote_code; "
                "pass that flag if you trust the code, or use a checkpoint without it"
            )


# The (--model, --trust_remote_code) pairs this process has checked: one process is one run.
CHECKED_MODELS: set[tuple[str, bool]] = set()


def check_model(model: str, trust_remote_code: bool = False, flag: str = "--model") -> None:
    """Refuse a --model (or --tokenizer) this project does not load, before anything is written: its format
    (check_checkpoint_format) and code of its own (check_remote_code). Every entry point of a run calls it (the
    command line, data preparation, loading) and the folder is read once, at the first; a refusal ends the run."""
    if (model, bool(trust_remote_code)) in CHECKED_MODELS:
        return
    check_checkpoint_format(model)
    check_remote_code(model, trust_remote_code, flag)
    CHECKED_MODELS.add((model, bool(trust_remote_code)))


def model_positions(model: str, trust_remote_code: bool = False) -> tuple[int | None, str]:
    """The model's maximum positions (None if unknown: a tokenizer folder without a model config) and its name."""
    if model in PRESETS:
        return PRESETS[model]["max_position_embeddings"], model
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception:
        return None, model
    return getattr(config, "max_position_embeddings", None), model


# The defaults that depend on what --model is, one rule for every script (see `model_defaults`).
PRETRAINED_LEARNING_RATE = {"full": 5e-5, "adapter": 2e-4, "chat adapter": 1e-3}
PRESET_MODULES_TO_SAVE = "embed_tokens,lm_head"
# Tokens per batch for a pretrained checkpoint, so that training fits a 16 GB machine: its vocabulary (49k-152k)
# makes each token's float32 logits 0.2-0.6 MB, kept several times for the loss and its gradient, and the activations
# add more (SmolLM2-135M: about 3.5 MB per token in all, so 1024 tokens peak near 5 GB and 2048 did not fit in 10 GB).
# Evaluation keeps no gradients: twice the tokens.
PRETRAINED_BATCH_TOKENS = {"train": 1024, "eval": 2048}


def model_defaults(
    model: str, adapter: bool, preset_learning_rate: float, row_tokens: int = 1024, chat: bool = False
) -> dict[str, Any]:
    """learning_rate, the batch sizes of a checkpoint (and modules_to_save for an adapter) for `model`.

    A preset's weights are random: it takes the script's own learning rate (tuned for it on the rating task, e.g.
    3e-3 full, 1e-2 LoRA) and batch sizes, and LoRA also trains the random embeddings and output layer in full
    (modules_to_save), which frozen would cap what the adapter can learn. A pretrained checkpoint is fine-tuned:
    5e-5 for full training, 2e-4 for LoRA (PEFT's and TRL's usual values), its embeddings frozen (an adapter of a
    few MB, not a copy of the vocabulary matrices), in batches of PRETRAINED_BATCH_TOKENS tokens: as many rows of
    `row_tokens` (the data's longest example) as fit, at least one. A LoRA adapter trained on chats (`chat`, sft.py)
    takes 1e-3: on a small chat file at 2e-4 it lowers the loss but adopts no style in tens of steps (measured:
    docs/sft.md)."""
    pretrained = model not in PRESETS
    kind = ("chat adapter" if chat else "adapter") if adapter else "full"
    defaults: dict[str, Any] = {"learning_rate": PRETRAINED_LEARNING_RATE[kind] if pretrained else preset_learning_rate}
    if pretrained:
        defaults["per_device_train_batch_size"] = max(1, PRETRAINED_BATCH_TOKENS["train"] // row_tokens)
        defaults["per_device_eval_batch_size"] = max(1, PRETRAINED_BATCH_TOKENS["eval"] // row_tokens)
    if adapter:
        defaults["modules_to_save"] = "" if pretrained else PRESET_MODULES_TO_SAVE
    return defaults


def describe_defaults(model: str, applied: dict[str, Any]) -> str:
    """The line printed at start: the defaults that `model` gave this run (pass only those no flag overrode)."""
    kind = "a preset with random weights" if model in PRESETS else "a pretrained checkpoint"
    values = []
    if "learning_rate" in applied:
        values.append(f"learning_rate {applied['learning_rate']:g}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if name in applied:
            values.append(f"{name} {applied[name]}")
    if "modules_to_save" in applied:
        values.append(f"modules_to_save {applied['modules_to_save'] or 'none'}")
    return f"defaults for {kind} ({model}): {', '.join(values)} (a flag given on the command line wins)"


def load_config(model: str, trust_remote_code: bool = False) -> Any:
    check_model(model, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_error(model, e, config=True)


def _load_error(model: str, e: Exception, config: bool) -> UserError:
    """The sentence for a failed load, naming its real cause: `config` says whether the config is what failed, or the
    model after its config had loaded (a missing package, a damaged weights file)."""
    cause = cause_of(e)
    if is_local_path(model):
        if not Path(model).exists():
            return UserError(
                f"--model {model} does not exist; pass a preset ({', '.join(PRESETS)}), a checkpoint directory or a Hub id"
            )
        if config:
            return UserError(f"--model {model} is not a model checkpoint directory (no loadable config.json: {cause})")
        return UserError(f"--model {model}: its config loaded but the model did not ({cause})")
    if not config:
        return UserError(f"could not load the model '{model}' ({cause})")
    return UserError(
        f"could not load '{model}' from the Hugging Face Hub ({cause}); "
        f"check the id and your network, or pass a local checkpoint directory or a preset ({', '.join(PRESETS)})"
    )


def check_tokenizer_matches(model: str, config: Any, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False) -> None:
    """The data was tokenized with `tokenizer`; a checkpoint must share its vocabulary."""
    if config.vocab_size < len(tokenizer):
        raise UserError(
            f"--model {model} has {config.vocab_size} embeddings but the data's tokenizer has {len(tokenizer)} tokens; "
            f"prepare the data with this model's tokenizer: python scripts/prepare_datasets.py --tokenizer {model} --output_dir <dir>"
        )
    if is_local_path(model) and (Path(model) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        own = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if own.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"--model {model} comes with a different tokenizer than the prepared data; prepare the data with it: "
                f"python scripts/prepare_datasets.py --tokenizer {model} --output_dir <dir>"
            )


def load_tokenizer(model: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model folder (or a Hub model's); one sentence when there is none."""
    from transformers import AutoTokenizer

    if is_local_path(model) and Path(model).is_dir() and not (Path(model) / "tokenizer_config.json").exists():
        raise UserError(
            f"{model} holds no tokenizer (tokenizer_config.json); save the one the model was trained with there: "
            "AutoTokenizer.from_pretrained('<its base>').save_pretrained('<this folder>')"
        )
    check_model(model, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"could not load the tokenizer of {model} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def check_vocabulary(model: str, config: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """A model's own tokenizer must fit its embeddings: a larger one gives ids the model has no row for."""
    if config.vocab_size < len(tokenizer):
        raise UserError(
            f"the tokenizer of {model} has {len(tokenizer)} tokens but the model only {config.vocab_size} embeddings, so "
            "they do not belong together; put the tokenizer the model was trained with in its folder"
        )


def check_weights_exist(model: str) -> None:
    """A local checkpoint folder must hold safetensors weights: a config alone (save_pretrained of a config, a copy
    cut short) or pickled *.bin weights, which this project never loads, would fail inside from_pretrained."""
    folder = Path(model)
    if not is_local_path(model) or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin") if p.name != "training_args.bin")
    if pickled:
        raise UserError(
            f"--model {model} has only pickled weights ({pickled[0]}), which this project does not load; convert them to "
            "safetensors (from_pretrained then save_pretrained, once, on a model you trust)"
        )
    raise UserError(
        f"--model {model} has a config.json but no weights (model.safetensors); pass a folder written by save_pretrained, "
        f"or a preset ({', '.join(PRESETS)}) to start from random weights"
    )


def check_max_length(model: Any, max_length: int) -> None:
    """The prepared data's longest example must fit the model's positions: beyond them, learned position
    embeddings index out of range and rotary ones extrapolate to positions never trained."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        name = getattr(model, "name_or_path", "") or model.config.model_type
        raise UserError(
            f"the prepared data has examples of {max_length} tokens but the model {name} takes at most {limit} "
            f"(max_position_embeddings); prepare the data with python scripts/prepare_datasets.py --max_length {limit} "
            f"(text in blocks: --block_size {min(limit, 1024)}) and --output_dir <new dir>, or use a model with more positions"
        )


def load_model(
    model: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """A preset with random weights (seed it first with `set_seed`) or a checkpoint via `from_pretrained`."""
    if model in PRESETS:
        config = preset_config(model, tokenizer)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    config = load_config(model, trust_remote_code)
    check_weights_exist(model)
    check_tokenizer_matches(model, config, tokenizer, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            # transformers 5.25 otherwise swaps layers for kernels it downloads from the Hub at load time ("kernelize"):
            # code from outside the checkpoint, fetched without asking, and an error on an offline GPU machine.
            use_kernels=False,
            **kwargs,
        )
    except Exception as e:
        raise _load_error(model, e, config=False)


def full_numel(p: torch.nn.Parameter) -> int:
    """A parameter's size in the model, not in this process's storage: ZeRO-3 leaves each process an empty
    placeholder (the size is `ds_numel`), and a 4-bit weight packs two values per byte (`quant_state.shape`)."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(full_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def skip_cpu_4bit_repacking(model: Any) -> None:
    """bitsandbytes 4-bit on a CPU with AVX512-BF16 repacks the weights on the first no-grad forward
    in eval mode; afterwards every LoRA gradient is None (with only a warning). Turning the
    repacking off on each 4-bit layer keeps training after an evaluation correct."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def save_preset_base(
    model: str,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    is_main_process: bool = True,
    reuse: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> str:
    """The base checkpoint an adapter is trained on, as a path `from_pretrained` loads.

    A preset has random weights that exist nowhere else, so the main process saves it (seeded by
    the caller's `set_seed`, safetensors, with the tokenizer) to <output_dir>/base; the others only
    get the path (call inside `main_process_first()`). The path is absolute, so the adapter's
    `base_model_name_or_path` loads from any folder; `reuse` keeps a base already there (resuming).
    A checkpoint directory comes back absolute too, a Hub id as it is."""
    if model not in PRESETS:
        return str(Path(model).resolve()) if is_local_path(model) and Path(model).is_dir() else model
    path = Path(output_dir, "base").resolve()
    if is_main_process and not (reuse and (path / "config.json").exists()):
        # fork_rng: the global RNG stays as it was, the same on every process, whoever built the base.
        with torch.random.fork_rng(devices=[]), torch.device(device):  # random init on a GPU: seconds for 1B
            preset = load_model(model, tokenizer, dtype=dtype)
        preset.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del preset
    return str(path)
