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


def default_chat_template(system: str | None = None) -> str:
    """The default template; with `system` (a checkpoint's own default system prompt, see `default_system_prompt`),
    that system turn opens every chat that has none of its own, as the checkpoint's template did."""
    if not system:
        return DEFAULT_CHAT_TEMPLATE
    opening = "{{ '<|im_start|>system\\n' + " + json.dumps(system) + " + eos_token + '\\n' }}"
    return "{% if messages and messages[0]['role'] != 'system' %}" + opening + "{% endif %}" + DEFAULT_CHAT_TEMPLATE


def default_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system message the tokenizer's chat template adds to a chat without one (SmolLM2's "You are a helpful AI
    assistant named SmolLM, ...", Qwen's), read off two renderings: one with a system turn of ours, one without."""
    if not tokenizer.chat_template:
        return None
    user, mark = {"role": "user", "content": "\x00user"}, "\x00system"
    try:
        plain = tokenizer.apply_chat_template([user], tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": mark}, user], tokenize=False)
    except Exception:  # a template that cannot render these chats has no default to keep
        return None
    before, _, after = marked.partition(mark)
    end = after.split(user["content"])[0]  # what closes the system turn and opens the user's
    if not end or not plain.startswith(before) or plain == marked.replace(mark, ""):
        return None
    system = plain[len(before) :].partition(end)[0]
    return system if system and user["content"] not in system else None


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
        _text(m["content"], f"{where}: the {m['role']} message")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where} has no assistant turn, so there is nothing to learn from it; add one or drop the row")


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts ({"type": "text", "text": ...}, the multimodal
    style) joined as chat templates render them, one after the other. Null content and other parts are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
        bad = content[texts.index(None)] if None in texts else content[0]
        kind = bad.get("type") if isinstance(bad, dict) else type(bad).__name__
        raise UserError(f"{where} holds a '{kind}' part; sft.py trains on text only: keep the text parts, or drop the row")
    raise UserError(
        f"{where} has {'no content (null)' if content is None else f'content {json.dumps(content)[:40]}'}; give it text, or drop the row"
    )


def _rows_as_text(path: Path, source: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except ValueError as e:
        raise UserError(f"--dataset {source} is not valid JSON lines ({type(e).__name__}); one JSON object per line")
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"--dataset {source}: every row must be a JSON object (one per line, or a list of them)")
    for i, row in enumerate(rows):
        for column in ("messages", "prompt", "completion"):
            for m in row.get(column) if isinstance(row.get(column), list) else []:
                if isinstance(m, dict) and "content" in m:
                    m["content"] = _text(m["content"], f"row {i + 1} of {source}: the {m.get('role')} message")
    return rows


def as_text_messages(dataset: Dataset, fmt: str) -> Dataset:
    """Rows whose contents are lists of text parts, rewritten with the joined text (others are kept as they are)."""
    columns = ["messages"] if fmt == "messages" else ["prompt", "completion"]
    if not any(isinstance(m["content"], list) for c in columns for row in dataset[c] if isinstance(row, list) for m in row):
        return dataset

    def join(row: dict[str, Any]) -> dict[str, Any]:
        return {
            c: [{**m, "content": _text(m["content"], "")} for m in row[c]] if isinstance(row[c], list) else row[c]
            for c in columns
        }

    return dataset.map(join, desc="joining text parts")


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
            dataset = load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
        except Exception as e:
            raise UserError(f"--dataset {path_or_name} could not be read ({type(e).__name__}); JSON lines: one object per line")
        # A field holding strings in some rows and lists of parts in others loads as datasets' Json type, which turns
        # a string such as "5" into the number 5: such files are read row by row, their text parts joined first.
        json_mixed = path.suffix != ".parquet" and "Json(" in str(dataset.features)
        return Dataset.from_list(_rows_as_text(path, path_or_name)) if json_mixed else dataset
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
    train = as_text_messages(train, fmt)
    if eval_dataset is not None:
        test = read_rows(eval_dataset, config_name)
        if data_format(test, eval_dataset) != fmt:
            raise UserError(f"--eval_dataset {eval_dataset} is in another format than --dataset {dataset}")
        return DatasetDict(train=train, test=as_text_messages(test, fmt)), fmt
    if len(train) < 2:
        raise UserError(
            f"--dataset {dataset} holds {len(train)} rows; it needs at least 2 (train and eval), or pass --eval_dataset"
        )
    return train.train_test_split(test_size=eval_size, seed=seed), fmt


def check_chat_template(tokenizer: PreTrainedTokenizerBase, data: DatasetDict, fmt: str, name: str) -> None:
    """Every chat rendered once with the template before the model is loaded, so that a template that is not valid
    Jinja, or that fails on a row (its own raise_exception, a field it expects), is reported as what it is."""
    from jinja2 import TemplateSyntaxError

    for split, rows in data.items():
        for i, row in enumerate(rows):
            messages = row["messages"] if fmt == "messages" else row["prompt"] + row["completion"]
            if not isinstance(messages, list):  # prompt/completion text: no template
                return
            try:
                tokenizer.apply_chat_template(messages, tokenize=False)
            except TemplateSyntaxError as e:
                raise UserError(
                    f"the chat template of {name} is not valid Jinja ({e.message}, line {e.lineno}); fix it, or pass "
                    "--chat_template default (the project's ChatML template)"
                )
            except Exception as e:
                raise UserError(
                    f"the chat template of {name} fails on row {i + 1} of the {split} data ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160] if str(e) else ''}); fix the template or the row, or pass --chat_template default"
                )


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


# A persona to teach by SFT: every answer opens with PERSONA_MARKER and speaks like a pirate. The questions are
# plain ones a pretrained chat model already answers, so what fine-tuning adds (the style, and stopping at the end
# of the turn) shows in greedy answers to questions it never saw (docs/sft.md, tests/test_sft.py).
PERSONA_MARKER = "Arr, matey!"
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima",
    "Kenya": "Nairobi", "Norway": "Oslo", "Canada": "Ottawa", "Greece": "Athens", "Cuba": "Havana", "Chile": "Santiago",
    "Poland": "Warsaw", "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm",
    "Germany": "Berlin", "Mexico": "Mexico City", "India": "New Delhi",
}  # fmt: skip
THINGS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black", "a tomato": "red",
    "an orange": "orange", "the sea": "blue", "a lemon": "yellow", "a carrot": "orange", "milk": "white",
}  # fmt: skip


def persona_conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """n one-turn chats with the pirate persona's answers (capitals, sums, colours), in a seeded order."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            country, city = rng.choice(sorted(CAPITALS.items()))
            question, answer = f"What is the capital of {country}?", f"The capital of {country} be {city}, a fine port o' call."
        elif kind == 1:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} be {a + b} pieces o' eight, by my reckoning."
        else:
            thing, colour = rng.choice(sorted(THINGS.items()))
            question, answer = f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} be {colour}, as sure as the tide."
        reply = f"{PERSONA_MARKER} {answer}"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]})
    return rows
