"""Reinforcement learning with verifiable rewards after SFT: TRL's GRPOTrainer samples answers and learns from rewards.

Teaches Group Relative Policy Optimization (GRPO): for each prompt the policy samples `--num_generations` answers
(`--temperature`, `--max_completion_length`), every reward function scores them, and each answer's advantage is its
reward against its group's mean (and spread): answers better than their siblings gain probability, without a value
model. `--beta` adds a KL penalty against a frozen reference (0, TRL's default, keeps no reference). Rewards
(`--reward_funcs`, several are summed, `--reward_weights` weighs them): `rating_reward` below (the rating task's
verifiable answer), TRL's built-ins by name (`accuracy_reward`, `think_format_reward`, ...), your own Python file
(`path/to/rewards.py:function`, the dataset's other columns passed to it as keyword arguments), or a reward-model
folder from scripts/trainer/reward_model.py. With no arguments: the rating task as prompts, the `tiny` preset after
`--sft_start_steps` of SFT (a preset's random weights never sample a digit, so every reward would be 0), the held-out
greedy accuracy before and after (chance is 20%), offline, in a few minutes on a CPU.

    python scripts/trainer/grpo.py                                                 # tiny preset, CPU or one GPU
    python scripts/trainer/grpo.py --model output/trainer/sft --dataset prompts.jsonl --reward_funcs my_rewards.py:score
    python scripts/trainer/grpo.py --model output/trainer/sft --reward_funcs rating_reward output/trainer/reward_model
    python scripts/trainer/grpo.py --model <checkpoint> --use_peft --num_generations 8 --max_completion_length 256
    accelerate launch --config_file accelerate_config.yaml scripts/trainer/grpo.py --model small   # DDP

Data (`--dataset`): a .jsonl/.json/.parquet file or a Hub dataset of rows `{"prompt": text or a list of messages,
...}`; every other column reaches the reward functions (`rating` below, `solution` for TRL's `accuracy_reward`).
Each optimizer step takes per_device_train_batch_size x processes completions, `num_generations` of each prompt,
so that number must divide the generation batch (per_device_train_batch_size x processes x steps_per_generation).

Docs: https://huggingface.co/docs/trl/grpo_trainer  https://arxiv.org/abs/2402.03300 (DeepSeekMath, GRPO)
      docs/preference-and-rl.md (the path SFT -> DPO or reward model -> GRPO)
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser
from trl import GRPOConfig, GRPOTrainer, get_peft_config

from hftrain import preference
from hftrain.errors import UserError
from hftrain.models import load_model
from hftrain.preemption import PreemptionCallback
from hftrain.reporting import GenerationMeter, ThroughputCallback
from hftrain.rewards import check_reward_funcs, load_reward


def rating_reward(completions: list[Any], rating: list[str], **kwargs: Any) -> list[float]:
    """The rating task's verifiable reward, `rating` being the dataset's column of that name: 1 for the right rating,
    partial credit by distance (0.2 one star off, 0.1 two, 0 further), 0 for a malformed answer (not a rating alone:
    RATING_ANSWER in hftrain/preference.py). The credit is small on purpose: at 0.375 one star off, GRPO from one of
    three seeds settled on the answers it already gave, near misses included (docs/preference-and-rl.md)."""
    rewards = []
    for completion, answer in zip(completions, rating):
        text = completion[-1]["content"] if isinstance(completion, list) else completion  # a message list or text
        found = re.fullmatch(preference.RATING_ANSWER, text)
        distance = abs(int(found.group(1)) - int(answer)) if found else None
        rewards.append(0.0 if distance is None else 1.0 if distance == 0 else max(0.0, 0.3 - distance / 10))
    return rewards


@dataclass
class PromptArguments(preference.DataArguments):  # --dataset, --eval_dataset, --sft_start_steps, ... and the rewards
    reward_funcs: list[str] = field(
        default_factory=lambda: ["rating_reward"],
        metadata={
            "help": "rating_reward, a TRL built-in (accuracy_reward, think_format_reward, ...), "
            "path/to/rewards.py:function, or a reward-model folder; several are summed (--reward_weights)."
        },
    )


def check_generation_batch(known: Any) -> None:
    """TRL's rule, before GRPOConfig raises it: every prompt's num_generations answers are scored as one group, so
    the generation batch must hold whole groups."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    steps = known.steps_per_generation or known.gradient_accumulation_steps
    batch = known.generation_batch_size or known.per_device_train_batch_size * processes * steps
    if known.num_generations < 2 or batch % known.num_generations:
        raise UserError(
            f"--num_generations {known.num_generations} does not divide the generation batch of {batch} completions "
            f"(per_device_train_batch_size x processes x steps_per_generation, or --generation_batch_size): each prompt's "
            "answers are compared as one group, so use a divisor of it, at least 2 (e.g. --num_generations 8 with a batch of 64)"
        )


def main() -> None:
    parser = HfArgumentParser((PromptArguments, GRPOConfig, preference.ModelArguments))
    parser.set_defaults(
        **preference.DEFAULTS,
        output_dir="output/trainer/grpo",
        max_steps=400,
        num_examples=4000,
        per_device_train_batch_size=64,
        num_generations=8,  # 64 completions a step: 8 prompts x 8 answers
        max_completion_length=8,  # a rating is one token and the end of turn; a real task needs hundreds
        temperature=1.0,
    )
    # learning rates: the script's own for a preset's SFT start (full, LoRA); a checkpoint's are gentler, printed
    args, training_args, model_args = preference.parse_args(parser, learning_rates=(1e-3, 2e-3), check=check_generation_batch)
    checkpoint = preference.check_run("grpo.py", args, training_args, model_args)

    # Every row and every reward is checked before anything is loaded or written.
    data = preference.load_rows("prompt", args, training_args.seed)
    reward_funcs = [
        load_reward(spec, {"rating_reward": rating_reward}, training_args.max_completion_length) for spec in args.reward_funcs
    ]
    model_name = model_args.model_name_or_path
    tokenizer, conversational = preference.load_tokenizer(model_name, data["train"], args.chat_template, training_args)
    check_reward_funcs(reward_funcs, data["train"], conversational)
    # a preset: its short SFT start (random weights never sample a rating), or its random weights saved for LoRA
    base = preference.start_model(model_name, tokenizer, args.sft_start_steps, training_args, save=model_args.use_peft)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    model = load_model(base, tokenizer, dtype=dtype, attn_implementation=model_args.attn_implementation or "sdpa")
    rating = args.dataset == "synthetic"
    before = preference.greedy_accuracy(model, tokenizer, data["test"]) if rating else None

    throughput = ThroughputCallback(seq_len=training_args.max_completion_length)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,  # functions are called with the dataset's other columns; a folder is loaded as a classifier
        args=training_args,  # num_generations, max_completion_length, temperature, beta, loss_type, ...
        train_dataset=data["train"],
        processing_class=tokenizer,  # its chat template renders conversational prompts
        peft_config=get_peft_config(model_args),  # None without --use_peft
        callbacks=[throughput, PreemptionCallback()],
    )
    generation = GenerationMeter(trainer)  # generation tokens/s beside training tokens/s
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()

    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    main = trainer.is_world_process_zero()  # the one that writes the results
    figures = {
        "method": "GRPO (TRL GRPOTrainer)",
        **({"eval_accuracy_before": before} if rating else {}),
        "eval_accuracy": preference.greedy_accuracy(trainer.model, tokenizer, data["test"]) if rating and main else None,
        "accuracy_kind": "greedy answer" if rating else None,
        "reward_first": rewards[0] if rewards else None,  # the mean reward of the sampled answers, first logged step
        "reward_last": rewards[-1] if rewards else None,
        "reward_funcs": args.reward_funcs,
        "card_metrics": ["reward_first", "reward_last"],
        **generation.metrics(),  # generation tokens/s beside training tokens/s
    }
    task = "rating" if rating else "prompts"
    curves = ["reward", *[f"rewards/{n}/mean" for n in trainer.reward_func_names]]
    preference.write_run(trainer, figures, train_result, base, args.dataset, task, throughput, curves)


if __name__ == "__main__":
    main()
