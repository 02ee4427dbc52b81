"""Data for preference tuning and RL after SFT: the rating task as preference pairs and as prompts with a verifiable
answer, user rows checked, and the short SFT start a preset needs before either.

Rows are what TRL's trainers take. Preference rows (`DPOTrainer`, `RewardTrainer`): `{"prompt", "chosen", "rejected"}`,
each text or a list of messages, or implicit-prompt rows `{"chosen", "rejected"}` (whole conversations sharing their
start, which TRL takes as the prompt). Prompt rows (`GRPOTrainer`): `{"prompt", ...}`, the other columns passed to
the reward functions as keyword arguments.
"""

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase, set_seed
from trl import ModelConfig
from trl.data_utils import is_conversational

from hftrain.chat import DEFAULT_CHAT_TEMPLATE, rating_conversations, read_rows
from hftrain.checkpoints import resolve_checkpoint
from hftrain.cli import check_output_dir, check_training_args, parse_command_line
from hftrain.data import DEFAULT_DATA_DIR, load_prepared
from hftrain.errors import UserError
from hftrain.extras import check_training_extras
from hftrain.lora import adapter_base
from hftrain.models import PRESETS, load_config, load_model, model_defaults
from hftrain.models import load_tokenizer as saved_tokenizer  # a checkpoint's, checked
from hftrain.reporting import write_results


@dataclass
class DataArguments:  # dpo.py and reward_model.py take it as it is; grpo.py adds its rewards
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (the rating task), a .jsonl/.json/.parquet file of pairs or prompts, or a Hub dataset."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split of --dataset to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "A split of --dataset to hold out (else --eval_size)."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "A held-out file in the same format (else --eval_size)."})
    eval_size: float = field(default=0.1, metadata={"help": "Share of --dataset held out without --eval_dataset."})
    num_examples: int = field(default=2000, metadata={"help": "Rows (pairs or prompts) generated for --dataset synthetic."})
    sft_start_steps: int = field(
        default=60, metadata={"help": "SFT steps on the rating chats first when --model is a preset (0: none)."}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "'default' (the project's ChatML template) or a .jinja file; else the tokenizer's own."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a run already in --output_dir."})


@dataclass
class ModelArguments(ModelConfig):  # TRL's model flags: --use_peft, --lora_r, --lora_alpha, --lora_target_modules, ...
    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "A preset (tiny, small, 1b), a local checkpoint directory or a Hub id.", "aliases": ["--model"]},
    )


# The defaults dpo.py, reward_model.py and grpo.py share (each adds its own steps, batch and learning rate).
DEFAULTS: dict[str, Any] = dict(
    logging_steps=10,
    save_strategy="no",
    gradient_checkpointing=None,  # off (TRL turns it on); None: no notice of its new name, --activation_checkpointing
    bf16=torch.cuda.is_available(),
    dataloader_pin_memory=torch.cuda.is_available(),
    report_to=["tensorboard"],
    lora_target_modules=["all-linear"],
)

# dpo.py and reward_model.py: the same pairs, in the same batches, evaluated as often.
PAIR_DEFAULTS: dict[str, Any] = dict(
    DEFAULTS,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    warmup_steps=10,
    eval_strategy="steps",
    eval_steps=50,
    max_length=512,
)

# A rating task answer: the digit alone (spaces around it allowed). Anything else is malformed: the reward gives it 0
# and the accuracy counts it wrong, so that sampling " 4 4 4" cannot earn what the answer "4" earns.
RATING_ANSWER = r"\s*([1-5])\s*"


def rating_preferences(n: int, seed: int) -> list[dict[str, Any]]:
    """The rating task as preference pairs: the review and question as the prompt, the right rating chosen and
    another one, drawn at random, rejected."""
    rng = random.Random(seed)
    rows = []
    for chat in rating_conversations(n, seed):
        prompt, answer = chat["messages"][:1], chat["messages"][1]["content"]
        wrong = rng.choice([r for r in "12345" if r != answer])
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


def rating_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """The rating task as prompts with a verifiable answer: the `rating` column is what the reward checks."""
    return [{"prompt": c["messages"][:1], "rating": c["messages"][1]["content"]} for c in rating_conversations(n, seed)]


def _empty(value: Any) -> bool:
    return (
        not value
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, list) and not any(m.get("content") for m in value))
    )


def check_preference_rows(rows: Dataset, source: str) -> None:
    missing = [c for c in ("chosen", "rejected") if c not in rows.column_names]
    if missing:
        raise UserError(
            f"{source} has no {' and no '.join(repr(c) for c in missing)} column; preference rows are "
            f"{{'prompt', 'chosen', 'rejected'}} (or implicit-prompt {{'chosen', 'rejected'}}); columns found: "
            f"{', '.join(rows.column_names) or 'none'}"
        )
    if all(c == r for c, r in zip(rows["chosen"], rows["rejected"])):
        raise UserError(f"in every row of {source} 'chosen' is identical to 'rejected', so there is no preference to learn")
    if "prompt" in rows.column_names:
        check_prompts(rows, source)


def check_prompts(rows: Dataset, source: str) -> None:
    if "prompt" not in rows.column_names:
        raise UserError(
            f"{source} has no 'prompt' column (text or a list of messages); columns found: {', '.join(rows.column_names) or 'none'}"
        )
    for i, prompt in enumerate(rows["prompt"]):
        if _empty(prompt):
            raise UserError(f"row {i + 1} of {source} has an empty prompt; give every row the text the model answers")


def load_rows(kind: str, args: DataArguments, seed: int) -> DatasetDict:
    """Train and test splits of `kind` rows ('preference' or 'prompt'), every row checked. 'synthetic' is the rating
    task; else a file or Hub dataset, held out by --eval_dataset, --dataset_test_split or a share of the rows."""
    check = check_preference_rows if kind == "preference" else check_prompts
    if args.dataset == "synthetic":
        make = rating_preferences if kind == "preference" else rating_prompts
        n_eval = max(1, int(args.num_examples * args.eval_size))
        return DatasetDict(
            train=Dataset.from_list(make(args.num_examples - n_eval, seed)), test=Dataset.from_list(make(n_eval, seed + 1))
        )
    train = read_rows(args.dataset, args.dataset_config_name, args.dataset_train_split)
    check(train, args.dataset)
    if args.eval_dataset is not None or args.dataset_test_split is not None:
        name = args.eval_dataset or f"{args.dataset} ({args.dataset_test_split})"
        test = read_rows(args.eval_dataset or args.dataset, args.dataset_config_name, args.dataset_test_split or "train")
        check(test, name)
        return DatasetDict(train=train, test=test)
    if len(train) < 2:
        raise UserError(
            f"--dataset {args.dataset} holds {len(train)} rows; it needs at least 2 (train and eval), or pass --eval_dataset"
        )
    return train.train_test_split(test_size=args.eval_size, seed=seed)


def check_chat_template(rows: Dataset, tokenizer: PreTrainedTokenizerBase, model: str) -> bool:
    """True for conversational rows, which need the tokenizer's chat template: one sentence if it has none."""
    conversational = is_conversational(rows[0])
    if conversational and not tokenizer.chat_template:
        raise UserError(
            f"the rows are conversations but the tokenizer of {model} has no chat template; pass --chat_template default "
            "(the project's ChatML template) or --chat_template <file.jinja>, or give text rows"
        )
    return conversational


def set_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None, preset: bool) -> None:
    """--chat_template: 'default' (also a preset's), a .jinja file, or None for the tokenizer's own."""
    if chat_template == "default" or (chat_template is None and preset):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    elif chat_template is not None:
        if not Path(chat_template).is_file():
            raise UserError(f"--chat_template {chat_template} is not a file; pass a .jinja file or 'default'")
        tokenizer.chat_template = Path(chat_template).read_text()


def parse_args(parser: Any, learning_rates: tuple[float, float], check: Callable[[Any], None] | None = None) -> tuple:
    """The command line, parsed once (hftrain.cli.parse_command_line, which also refuses a --model this project does
    not load): the learning rate and LoRA's modules_to_save follow --model as in every script (a preset's SFT start
    takes `learning_rates`, full and LoRA; a checkpoint the gentle ones, printed at start; a flag wins); the batches
    stay the script's own (pairs of answers, groups of generations). `check` runs on the parsed values first."""

    def defaults(namespace: Any) -> dict[str, Any]:
        rate = learning_rates[1] if namespace.use_peft else learning_rates[0]
        by_model = model_defaults(namespace.model_name_or_path, namespace.use_peft, rate)
        return {k: v for k, v in by_model.items() if not k.startswith("per_device_")}

    def checks(namespace: Any) -> None:
        check_training_extras(namespace)
        if check is not None:
            check(namespace)

    return parse_command_line(parser, check=checks, defaults=defaults, names=("learning_rate", "lora_modules_to_save"))


def check_run(script: str, args: DataArguments, training_args: Any, model_args: ModelArguments) -> str | None:
    """What every run checks before it loads anything: an unquantised base, the training flags, the output folder
    (never the --model folder, inside it or holding it). Returns the checkpoint to resume from, if any."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UserError(f"{script} trains bf16/float32 weights; quantised bases are not part of this example")
    check_training_args(training_args)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    main = training_args.process_index == 0
    check_output_dir(training_args.output_dir, args.overwrite_output_dir, checkpoint is not None, main, model_args)
    return checkpoint


def load_tokenizer(
    model: str, rows: Dataset, chat_template: str | None, training_args: Any
) -> tuple[PreTrainedTokenizerBase, bool]:
    """The tokenizer of --model (a preset's is the prepared data's) with its chat template (--chat_template), checked
    against the rows; and whether they are conversational."""
    preset = model in PRESETS
    if preset:
        with training_args.main_process_first():
            tokenizer = load_prepared(DEFAULT_DATA_DIR).tokenizer
    else:
        load_config(model, training_args.trust_remote_code)  # one sentence if it is not a checkpoint
        tokenizer = saved_tokenizer(model, training_args.trust_remote_code)  # one sentence if it holds none
    set_chat_template(tokenizer, chat_template, preset)
    return tokenizer, check_chat_template(rows, tokenizer, model)


def start_model(model: str, tokenizer: PreTrainedTokenizerBase, sft_start_steps: int, training_args: Any, save: bool) -> str:
    """The folder training starts from: --model itself; for a preset, its short SFT start (random weights answer
    nothing yet) or, with --sft_start_steps 0 and `save`, its random weights saved, so that a reference model or an
    adapter's base loads the same weights."""
    set_seed(training_args.seed)
    if model not in PRESETS:
        return model
    if sft_start_steps:
        return sft_start(model, tokenizer, sft_start_steps, training_args)
    return adapter_base(model, tokenizer, training_args) if save else model  # kept when resuming


def sft_start(preset: str, tokenizer: PreTrainedTokenizerBase, steps: int, training_args: Any) -> str:
    """A preset's random weights cannot answer at all, so neither a preference nor a reward can tell answers apart:
    `steps` of TRL's SFTTrainer on the rating chats teach it the answer format (and part of the task), saved to
    <output_dir>/sft_start, the start (and the LoRA base) of the run. Every process takes part (DDP)."""
    from trl import SFTConfig, SFTTrainer

    out = str(Path(training_args.output_dir, "sft_start"))
    config = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        warmup_steps=min(10, steps),
        assistant_only_loss=True,
        activation_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=max(1, steps // 4),
        seed=training_args.seed,
        bf16=training_args.bf16,
        use_cpu=training_args.use_cpu,
        dataloader_pin_memory=training_args.dataloader_pin_memory,
        disable_tqdm=training_args.disable_tqdm,
    )
    data = Dataset.from_list(rating_conversations(steps * 32 * config.world_size, training_args.seed + 7))
    trainer = SFTTrainer(load_model(preset, tokenizer), args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()  # main process; the others wait for it below
    trainer.accelerator.wait_for_everyone()
    return out


def write_run(
    trainer: Any,
    figures: dict[str, Any],
    train_result: Any,
    base: str,
    dataset: str,
    task: str,
    throughput: Any,
    curves: list[str],
    eval_metrics: dict | None = None,
) -> None:
    """Process 0 writes metrics.json, training_curves.png and the model card: the script's own `figures`, then what
    every run reports (the final held-out metrics under TRL's names, loss, steps, base, data, tokens/s, peak memory);
    then every process ends the run."""
    if trainer.is_world_process_zero():
        facts = {
            **{k: v for k, v in (eval_metrics or {}).items() if k.startswith("eval_")},
            "train_loss": train_result.training_loss,
            "steps": trainer.state.global_step,
            "base_model": base,
            "dataset": dataset,
            "task": task,
            **throughput.metrics,
        }
        write_results(trainer.args.output_dir, {**figures, **facts}, trainer.state.log_history, curves=curves)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def greedy_accuracy(model: Any, tokenizer: PreTrainedTokenizerBase, rows: Dataset, max_new_tokens: int = 4) -> float:
    """The share of held-out rating rows (preference or prompt rows) whose greedy answer, generated as a user gets it
    (the prompt rendered with the chat template, greedy decoding), is the right rating alone (`RATING_ANSWER`)."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    truths = rows["rating"] if "rating" in rows.column_names else [c[-1]["content"] for c in rows["chosen"]]
    right = 0
    for start in range(0, len(rows), 64):
        prompts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in rows["prompt"][start : start + 64]
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for answer, truth in zip(answers, truths[start : start + 64]):
            found = re.fullmatch(RATING_ANSWER, answer)
            right += found is not None and found.group(1) == truth
    tokenizer.padding_side = side
    return right / len(rows)
