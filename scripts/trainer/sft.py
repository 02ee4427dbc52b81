"""Chat and instruction fine-tuning with TRL's SFTTrainer: a chat template, the loss on the assistant's tokens only.

Teaches supervised fine-tuning (SFT) on conversations: `SFTConfig` (TrainingArguments plus the SFT fields),
`SFTTrainer` rendering each chat with the tokenizer's chat template, `assistant_only_loss` so that the model
learns to answer and not to write the user's turns, `--packing`, LoRA through TRL's `ModelConfig` flags, and
NEFTune (`--neftune_noise_alpha`, the instruction-tuning regulariser). With no arguments it trains the
`tiny` preset on the rating task as chats (the user gives a review and asks for its stars, the assistant
answers the digit) and reports the answers' accuracy (chance is 20%), offline, in a few minutes on a CPU.

    python scripts/trainer/sft.py                                            # tiny preset, CPU or one GPU
    python scripts/trainer/sft.py --model <checkpoint> --dataset chats.jsonl --use_peft    # LoRA on your chats
    python scripts/trainer/sft.py --model <checkpoint> --dataset chats.jsonl --packing --neftune_noise_alpha 5
    accelerate launch --config_file accelerate_config.yaml scripts/trainer/sft.py --model small   # DDP
    python scripts/generate.py --model_dir output/trainer/sft --chat --prompt "..."       # talk to the result

Data (`--dataset`): a .jsonl/.json file or a Hub dataset (`--dataset_config_name`) with rows
`{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}` (the loss on every
assistant turn), or `{"prompt": ..., "completion": ...}` (the loss on the completion; text or message lists).
`--eval_dataset` is held out, else `--eval_size` of the rows.

The chat template: the checkpoint's own; for presets, and with `--chat_template default`, the project's
(ChatML turns closed by the tokenizer's EOS, in hftrain/chat.py); or `--chat_template file.jinja`. The
assistant-only loss needs `{% generation %}` markers around the assistant's text: the default template has
them, and TRL adds them to the templates it knows (Llama 3, Qwen, Gemma, Phi, ...); for another template pass
one with the markers, or `--assistant_only_loss false` to learn the whole conversation. The template used is
saved with the tokenizer, so generation later formats prompts as in training.

Docs: https://huggingface.co/docs/trl/sft_trainer
      https://huggingface.co/docs/transformers/chat_templating (and its "generation" markers section)
      https://huggingface.co/docs/trl/main/en/peft_integration
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, HfArgumentParser, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from hftrain.chat import answer_accuracy, check_chat_template, default_chat_template, default_system_prompt, load_chat_data
from hftrain.checkpoints import check_same_model
from hftrain.cli import MODEL_DEPENDENT, check_batch_size, parse_command_line
from hftrain.data import DEFAULT_DATA_DIR, load_prepared
from hftrain.errors import UserError
from hftrain.lora import adapter_base, trained_in_full
from hftrain.models import PRESETS, load_config, load_model, model_defaults
from hftrain.preemption import PreemptionCallback
from hftrain.reporting import ThroughputCallback
from hftrain.trainer import DEFAULTS, check_training_flags, finish_run, start_run


@dataclass
class ScriptArguments:
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (the rating task as chats), a .jsonl/.json file of chats or a Hub dataset name."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    eval_dataset: str | None = field(default=None, metadata={"help": "A held-out file in the same format (else --eval_size)."})
    eval_size: float = field(default=0.1, metadata={"help": "Share of --dataset held out for evaluation without --eval_dataset."})
    num_examples: int = field(default=3000, metadata={"help": "Chats generated for --dataset synthetic."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "'default' (the project's ChatML template) or a .jinja file; else the tokenizer's own."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a run already in --output_dir."})
    streaming: bool = field(
        default=False, metadata={"help": "Not here: chats are checked and rendered whole; stream text with getting_started.py."}
    )


@dataclass
class ModelArguments(ModelConfig):  # TRL's model flags: --use_peft, --lora_r, --lora_alpha, --lora_target_modules, ...
    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "A preset (tiny, small, 1b), a local checkpoint directory or a Hub id.", "aliases": ["--model"]},
    )


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, SFTConfig, ModelArguments))
    parser.set_defaults(
        **DEFAULTS,  # the Trainer scripts' (hftrain/trainer.py), then what SFT changes
        output_dir="output/trainer/sft",
        eval_on_start=True,  # the eval loss on the assistant's tokens before training, then after each epoch
        max_length=512,
        assistant_only_loss=True,
        gradient_checkpointing=None,  # off (TRL turns it on); None: no notice of its new name, --activation_checkpointing
        lora_target_modules=["all-linear"],
    )
    # The defaults a preset and a pretrained checkpoint need differ (sft_defaults, printed at start); a flag wins.
    by_model = (*MODEL_DEPENDENT, "lora_modules_to_save", "warmup_steps")
    args, training_args, model_args = parse_command_line(
        parser, check=check_training_flags, defaults=sft_defaults, names=by_model
    )
    model_name = model_args.model_name_or_path
    preset = model_name in PRESETS
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UserError("sft.py trains bf16/float32 weights; for a 4-bit base use scripts/trainer/qlora.py")
    checkpoint = start_run(model_name, args, training_args, check=check_sft, streams=False, inputs=model_args)

    # Every row is checked before anything is loaded or written.
    data, fmt = load_chat_data(
        args.dataset, args.dataset_config_name, args.eval_dataset, args.eval_size, args.num_examples, training_args.seed
    )
    if preset:
        with training_args.main_process_first():  # the project's tokenizer, trained on the rating task's reviews
            tokenizer = load_prepared(DEFAULT_DATA_DIR).tokenizer
    else:
        load_config(model_name, training_args.trust_remote_code)  # one sentence if it is not a checkpoint
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=training_args.trust_remote_code)

    if args.chat_template == "default" or (args.chat_template is None and preset):
        # The checkpoint's own default system prompt stays: its answers were trained to follow it.
        tokenizer.chat_template = default_chat_template(default_system_prompt(tokenizer))
    elif args.chat_template is not None:
        if not Path(args.chat_template).is_file():
            raise UserError(f"--chat_template {args.chat_template} is not a file; pass a .jinja file or 'default'")
        tokenizer.chat_template = Path(args.chat_template).read_text()
    conversational = fmt == "messages" or isinstance(data["train"][0]["prompt"], list)
    if conversational and not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {model_name} has no chat template; pass --chat_template default (the project's ChatML "
            "template) or --chat_template <file.jinja>"
        )
    if tokenizer.eos_token is None:
        raise UserError(
            f"the tokenizer of {model_name} has no EOS token, which SFT needs (to end each answer, to pad, and with "
            "--packing to separate the packed chats); use a checkpoint whose tokenizer defines one"
        )
    template_name = args.chat_template if args.chat_template not in (None, "default") else model_name
    if conversational:
        check_chat_template(tokenizer, data, fmt, template_name)  # a broken template: its own error, not TRL's later
    # prompt/completion rows: the loss on the completion (TRL's completion_only_loss) plays the same part.
    training_args.assistant_only_loss = training_args.assistant_only_loss and fmt == "messages"
    if training_args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        try:  # TRL swaps in a marked copy of the templates it knows; others cannot mask the assistant's tokens
            get_training_chat_template(tokenizer)
        except ValueError:
            raise UserError(
                f"the chat template of {template_name} has no {{% generation %}} markers, which the assistant-only loss "
                "needs, and TRL has no marked version of it; pass --chat_template default (ChatML), a template file "
                "with the markers, or --assistant_only_loss false to learn whole conversations"
            )

    # A batch larger than the training rows is refused, as in the other Trainer scripts.
    check_batch_size(training_args.per_device_train_batch_size, training_args.world_size, len(data["train"]))
    set_seed(training_args.seed)  # the preset's random weights depend on it
    base = model_name
    if model_args.use_peft and preset:  # an adapter needs its base saved: a preset's random weights exist nowhere else
        base = adapter_base(model_name, tokenizer, training_args)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    model = load_model(
        base,
        tokenizer,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation or "sdpa",
        trust_remote_code=training_args.trust_remote_code,
    )

    peft_config = get_peft_config(model_args)  # LoraConfig(...) from TRL's --lora_* flags; None without --use_peft
    if peft_config is not None:  # one trained copy for a tied model's embeddings and output layer (hftrain/lora.py)
        peft_config.ensure_weight_tying = trained_in_full(peft_config.modules_to_save, model)["ensure_weight_tying"]
    trainer = SFTTrainer(
        model=model,
        args=training_args,  # assistant_only_loss, packing, max_length, neftune_noise_alpha, ...
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,  # its chat template renders the chats; saved beside the model
        peft_config=peft_config,
        # tokens/s and peak memory; SIGTERM or Ctrl-C: save a checkpoint, then exit
        callbacks=[ThroughputCallback(seq_len=training_args.max_length), PreemptionCallback()],
    )
    if model_args.use_peft:
        trainer.model.print_trainable_parameters()
    check_same_model(checkpoint, trainer.model)  # a checkpoint saved from another --model: one sentence
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()  # the model (or the adapter) in safetensors, the tokenizer with its chat template

    metrics = {}
    if trainer.is_world_process_zero():
        if args.dataset == "synthetic":  # the answer a user would get: the most likely next token is the digit
            accuracy, kind = answer_accuracy(trainer.model, tokenizer, list(data["test"])), "answer"
        else:
            accuracy, kind = eval_metrics["eval_mean_token_accuracy"], "assistant next-token"
        metrics = {
            "eval_accuracy": accuracy,
            "accuracy_kind": kind,
            "eval_loss": eval_metrics["eval_loss"],
            "train_loss": train_result.training_loss,
            "steps": trainer.state.global_step,
            "base_model": base,
            "dataset": args.dataset,
            "data_format": fmt,
            "task": "rating" if args.dataset == "synthetic" else "chat",
        }
    finish_run(trainer, metrics)  # metrics.json, the PNG, the model card; --push_to_hub: the folder uploaded


def sft_defaults(args: Any) -> dict[str, Any]:
    """The project's one rule (hftrain.models.model_defaults), for chats: a preset's random weights need a high learning
    rate, and LoRA on it must also train the embeddings and the output layer; a pretrained checkpoint is fine-tuned
    gently and keeps them frozen (a few-MB adapter), in batches of --max_length rows that fill 1024 tokens (2 of 512: its
    logits are large); a small chat file then takes more, smaller steps, and the warmup is a tenth of the run, however
    short (docs/sft.md)."""
    preset_learning_rate = 1e-2 if args.use_peft else 3e-3
    defaults = model_defaults(args.model_name_or_path, args.use_peft, preset_learning_rate, args.max_length, chat=True)
    return {**defaults, "warmup_steps": 30 if args.model_name_or_path in PRESETS else 0.1}


def check_sft(args: ScriptArguments, training_args: SFTConfig) -> None:
    if args.streaming:
        raise UserError(
            "sft.py does not stream: every chat is checked before training and TRL renders and tokenizes the whole set; "
            "stream a text corpus with --streaming in scripts/trainer/getting_started.py or the custom loops"
        )


if __name__ == "__main__":
    main()
