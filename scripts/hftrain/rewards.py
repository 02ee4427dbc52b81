"""GRPO's reward functions named on the command line, each checked on the first rows before any training.

`--reward_funcs` takes, each: a reward the script defines (by name), one of TRL's built-in rewards (`trl.rewards`,
by name), `path/to/rewards.py:function` (a user's file), or a folder with a reward model (a sequence classifier, e.g.
the output of scripts/trainer/reward_model.py). TRL calls a function as `f(prompts=..., completions=...,
completion_ids=..., **columns)`, every other column of the dataset a keyword argument, and wants one number (or
None) per completion back.

Docs: https://huggingface.co/docs/trl/grpo_trainer#using-a-custom-reward-function  https://huggingface.co/docs/trl/rewards
"""

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoConfig

from hftrain.errors import UserError

# TRL's built-ins: functions as they are, factories (get_*) called with the run's completion length or their defaults.
BUILTIN_REWARDS = (
    "accuracy_reward",
    "reasoning_accuracy_reward",
    "think_format_reward",
    "get_soft_overlong_punishment",
    "get_repetition_penalty_reward",
    "get_cosine_scaled_reward",
)


def load_reward(spec: str, own: dict[str, Callable[..., Any]], max_completion_length: int) -> Callable[..., Any] | str:
    """A reward function, or a reward-model folder as TRL takes it (a path it loads as a sequence classifier)."""
    if spec in own:
        return own[spec]
    if spec in BUILTIN_REWARDS:
        import trl.rewards

        builtin = getattr(trl.rewards, spec)
        if spec == "get_soft_overlong_punishment":
            return builtin(max_completion_len=max_completion_length, soft_punish_cache=max(1, max_completion_length // 4))
        return builtin() if spec.startswith("get_") else builtin
    if Path(spec).is_dir():
        check_reward_model(spec)
        return spec
    if ":" in spec:
        file, name = spec.rsplit(":", 1)
        if not Path(file).is_file() or Path(file).suffix != ".py":
            raise UserError(f"--reward_funcs {spec}: the file {file} does not exist (give path/to/rewards.py:function)")
        module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own file, named by them on the command line
        func = getattr(module, name, None)
        if not callable(func):
            found = [
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and v.__module__ == module.__name__
            ]
            raise UserError(
                f"--reward_funcs {spec}: {file} has no function {name} (functions there: {', '.join(found) or 'none'})"
            )
        return func
    raise UserError(
        f"--reward_funcs {spec} is not a reward: give one of {', '.join([*own, *BUILTIN_REWARDS])}, "
        "path/to/rewards.py:function, or a reward-model folder"
    )


def check_reward_model(folder: str) -> None:
    """A reward model scores a text with one number: a sequence classifier (as reward_model.py saves), not a causal LM."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(
            f"--reward_funcs {folder} is a folder but not a model checkpoint ({type(e).__name__}); give a reward-model folder"
        )
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"--reward_funcs {folder} is not a sequence classifier ({', '.join(architectures) or 'no architecture'}), so it "
            "cannot score completions; train a reward model with scripts/trainer/reward_model.py and pass its folder"
        )


def check_reward_funcs(funcs: list[Callable[..., Any] | str], rows: Dataset, conversational: bool, n: int = 8) -> None:
    """Call each reward function as TRL will, on the first `n` rows with an empty completion, before training: one
    sentence naming the function and the row if it raises, or if it returns a number of values other than one per
    completion."""
    batch = rows.select(range(min(n, len(rows))))
    columns = {c: batch[c] for c in batch.column_names if c != "prompt"}
    empty: Any = [{"role": "assistant", "content": ""}] if conversational else ""
    noop = lambda *args, **kwargs: None  # noqa: E731 (TRL's log_extra/log_metric callbacks)

    def call(func: Callable[..., Any], rows: range) -> Any:
        return func(
            prompts=[batch["prompt"][i] for i in rows],
            completions=[empty for _ in rows],
            completion_ids=[[] for _ in rows],
            trainer_state=None,
            log_extra=noop,
            log_metric=noop,
            **{c: [v[i] for i in rows] for c, v in columns.items()},
        )

    for func in funcs:
        if isinstance(func, str):
            continue
        name = getattr(func, "__name__", type(func).__name__)
        try:
            out = list(call(func, range(len(batch))))
        except Exception:
            for i in range(len(batch)):  # the first row it fails on
                try:
                    call(func, range(i, i + 1))
                except Exception as e:
                    raise UserError(
                        f"the reward function {name} raised {type(e).__name__} ({str(e)[:120]}) on row {i + 1} of the "
                        f"training data (called with an empty completion and the row's columns {', '.join(columns) or 'none'})"
                    )
            raise
        if len(out) != len(batch):
            raise UserError(
                f"the reward function {name} returned {len(out)} values for rows 1-{len(batch)} ({len(batch)} completions); "
                "it must return one number (or None) per completion"
            )
