"""Chat data for supervised fine-tuning: the rating task as conversations, user files checked, a default template.

Rows are what TRL's `SFTTrainer` takes: conversational (`{"messages": [{"role": ..., "content": ...}, ...]}`)
or prompt/completion (`{"prompt": ..., "completion": ...}`, both text or both lists of messages).
"""

import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from hftrain import task
from hftrain.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
QUESTION = "Rating?"  # short: the project's tokenizer was trained on reviews, other words cost a token per letter

# The project's default chat template: ChatML turns (`<|im_start|>role\n...`) closed by the tokenizer's own EOS
# token, so a model learns to stop with the token `generate` stops on, whatever the tokenizer; for ChatML models
# (SmolLM2, Qwen2.5), whose EOS is <|im_end|>, it renders exactly their format, without a default system prompt.
# The {% generation %} markers tell `apply_chat_template(..., return_assistant_tokens_mask=True)` which tokens are
# the assistant's: TRL's `assistant_only_loss` computes the loss on those only (the closing EOS included).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def rating_conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """The embedded rating task as chats: the user gives a review and asks for its rating, the assistant answers
    the digit (balanced ratings, so guessing scores 20%)."""
    rows = []
    for text in task.make_reviews(n, seed):
        review, rating = text.rsplit(task.ANSWER_PREFIX, 1)
        rows.append(
            {"messages": [{"role": "user", "content": f"{review}\n{QUESTION}"}, {"role": "assistant", "content": rating.strip()}]}
        )
    return rows


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: every message needs a 'role' and a 'content' (found {json.dumps(m)[:80]})")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: unknown role '{m['role']}' (the roles are {', '.join(ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where} has no assistant turn, so there is nothing to learn from it; add one or drop the row")


def data_format(dataset: Dataset, source: str) -> str:
    """'messages' or 'prompt_completion' after checking every row; one sentence naming the first bad row otherwise."""
    columns = dataset.column_names
    if "messages" in columns:
        for i, messages in enumerate(dataset["messages"]):
            _check_messages(messages, f"row {i + 1} of {source}")
        return "messages"
    if "prompt" in columns and "completion" in columns:
        for i, (prompt, completion) in enumerate(zip(dataset["prompt"], dataset["completion"])):
            where = f"row {i + 1} of {source}"
            if isinstance(prompt, str) and isinstance(completion, str):
                continue
            if not isinstance(prompt, list) or not isinstance(completion, list):
                raise UserError(f"{where}: 'prompt' and 'completion' must both be text or both be lists of messages")
            _check_messages(prompt + completion, where)
            if not any(m["role"] == "assistant" for m in completion):
                raise UserError(f"{where}: the completion has no assistant turn")
        return "prompt_completion"
    raise UserError(
        f"{source} has no 'messages' column (nor 'prompt' and 'completion'); columns found: {', '.join(columns) or 'none'}"
    )


def read_rows(path_or_name: str, config_name: str | None, split: str = "train") -> Dataset:
    """Rows from a .jsonl/.json/.parquet file, or one split of a Hub dataset (with its configuration)."""
    path = Path(path_or_name)
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise UserError(f"--dataset {path_or_name} does not exist")
        try:
            return load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
        except Exception as e:
            raise UserError(f"--dataset {path_or_name} could not be read ({type(e).__name__}); JSON lines: one object per line")
    if path.exists():
        raise UserError(f"--dataset {path_or_name}: give a .jsonl, .json or .parquet file of rows, or a Hub dataset name")
    try:
        raw = load_dataset(path_or_name, config_name)
    except Exception as e:
        raise UserError(
            f"could not load the dataset '{path_or_name}' ({type(e).__name__}); check the name (and --dataset_config_name) "
            "and your network, or pass a local .jsonl file"
        )
    if split not in raw:
        raise UserError(f"--dataset {path_or_name} has no '{split}' split (it has: {', '.join(raw)})")
    return raw[split]


def load_chat_data(
    dataset: str, config_name: str | None, eval_dataset: str | None, eval_size: float, num_examples: int, seed: int
) -> tuple[DatasetDict, str]:
    """Train and eval splits and their format ('messages' or 'prompt_completion'), every row checked."""
    if dataset == "synthetic":
        n_eval = max(1, int(num_examples * eval_size))
        splits = DatasetDict(
            train=Dataset.from_list(rating_conversations(num_examples - n_eval, seed)),
            test=Dataset.from_list(rating_conversations(n_eval, seed + 1)),
        )
        return splits, "messages"
    train = read_rows(dataset, config_name)
    fmt = data_format(train, dataset)
    if eval_dataset is not None:
        test = read_rows(eval_dataset, config_name)
        if data_format(test, eval_dataset) != fmt:
            raise UserError(f"--eval_dataset {eval_dataset} is in another format than --dataset {dataset}")
        return DatasetDict(train=train, test=test), fmt
    if len(train) < 2:
        raise UserError(
            f"--dataset {dataset} holds {len(train)} rows; it needs at least 2 (train and eval), or pass --eval_dataset"
        )
    return train.train_test_split(test_size=eval_size, seed=seed), fmt


def answer_accuracy(model: Any, tokenizer: PreTrainedTokenizerBase, conversations: list[dict[str, Any]]) -> float:
    """For chats whose last turn is a one-token answer (the rating digit): the share of prompts (every turn but
    the last, then the generation prompt) whose most likely next token, over the whole vocabulary, is the answer:
    what greedy generation would answer."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # each prompt's next token sits at the last position
    right = 0
    for start in range(0, len(conversations), 32):
        batch = conversations[start : start + 32]
        prompts = [tokenizer.apply_chat_template(c["messages"][:-1], add_generation_prompt=True, tokenize=False) for c in batch]
        answers = [tokenizer(c["messages"][-1]["content"], add_special_tokens=False)["input_ids"][0] for c in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1]
        right += int((logits.argmax(-1).cpu() == torch.tensor(answers)).sum())
    tokenizer.padding_side = side
    return right / len(conversations)
