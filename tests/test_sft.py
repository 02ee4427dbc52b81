"""scripts/trainer/sft.py: chat fine-tuning with TRL learns the rating task, masks all but the assistant's tokens,
reads JSONL chats and prompt/completion rows, packs, trains LoRA, refuses bad input, and improves a real checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset

from conftest import read_metrics, run_in_process, run_script
from hftrain.chat import DEFAULT_CHAT_TEMPLATE, QUESTION, rating_conversations
from hftrain.data import load_prepared
from hftrain.models import load_model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_losses(metrics: dict) -> list[tuple[int, float]]:
    return [(row["step"], row["eval_loss"]) for row in metrics["log_history"] if "eval_loss" in row]


def test_default_run_learns_the_answers(sft_tiny: Path) -> None:
    metrics = read_metrics(sft_tiny)
    assert metrics["accuracy_kind"] == "answer"
    assert metrics["eval_accuracy"] >= 0.5, metrics["eval_accuracy"]  # chance is 0.2
    (step0, before), *_, (_, after) = eval_losses(metrics)
    assert step0 == 0 and after < before / 4, (before, after)  # eval_on_start: the loss before any step
    assert (sft_tiny / "model.safetensors").exists()
    assert (sft_tiny / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE  # generation formats as trained


@pytest.fixture
def trainer_for(workdir: Path, tmp_path: Path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_prepared(str(workdir / "data/synthetic")).tokenizer
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    def make(rows: list[dict], **config) -> SFTTrainer:
        args = SFTConfig(output_dir=str(tmp_path), report_to=[], gradient_checkpointing=False, bf16=False, **config)
        return SFTTrainer(
            load_model("tiny", tokenizer), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )

    return make


def test_assistant_only_loss_masks_everything_but_the_assistant_turns(trainer_for) -> None:
    chat = [
        {"role": "system", "content": "You rate reviews."},
        {"role": "user", "content": f"The lamp is superb. {QUESTION}"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": f"The kettle is awful. {QUESTION}"},
        {"role": "assistant", "content": "1"},
    ]
    trainer = trainer_for([{"messages": chat}], assistant_only_loss=True)
    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # Both answers and the EOS that ends each (so the model learns to stop); the system and user turns are -100.
    assert tokenizer.decode(ids[labels != -100]) == "5<|eos|>1<|eos|>"
    assert (labels[labels != -100] == ids[labels != -100]).all()
    # Without the option the whole conversation is learned: the comparison that makes the check above mean something.
    whole = trainer_for([{"messages": chat}], assistant_only_loss=False)
    assert (whole.data_collator([whole.train_dataset[0]])["labels"][0] != -100).sum() > 5 * (labels != -100).sum()


def test_prompt_completion_rows_learn_the_completion_only(trainer_for) -> None:
    trainer = trainer_for([{"prompt": f"The lamp is superb.\n{QUESTION}", "completion": " 5"}])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert trainer.processing_class.decode(ids[labels != -100]) == " 5<|eos|>"


def test_jsonl_chats_with_lora(workdir: Path, tmp_path: Path) -> None:
    rows = rating_conversations(160, 3)
    rows[0]["messages"].insert(0, {"role": "system", "content": "You rate reviews."})
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "out"
    args = ["--dataset", str(data), "--use_peft", "--max_steps", "8", "--warmup_steps", "0", "--output_dir", str(out)]
    proc = run_script("trainer/sft.py", *args, cwd=workdir)
    assert "defaults for a preset with random weights (tiny): learning_rate 0.01" in proc.stdout
    assert (out / "adapter_model.safetensors").exists() and (out / "base" / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}  # a preset's random embeddings must learn
    metrics = read_metrics(out)
    (_, before), *_, (_, after) = eval_losses(metrics)
    assert after < before - 1, (before, after)
    assert metrics["data_format"] == "messages" and metrics["accuracy_kind"] == "assistant next-token"


def test_prompt_completion_file_with_packing(workdir: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": c["messages"][0]["content"], "completion": " " + c["messages"][1]["content"]}
        for c in rating_conversations(200, 4)
    ]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "out"
    args = ["--dataset", str(data), "--packing", "--max_length", "256", "--per_device_train_batch_size", "8"]
    args += ["--num_train_epochs", "1", "--eval_on_start", "false", "--output_dir", str(out)]
    run_script("trainer/sft.py", *args, cwd=workdir)
    metrics = read_metrics(out)
    # 180 training rows of ~40 tokens, one row each, would take 23 steps of 8; packed into 256-token rows, a handful.
    assert metrics["steps"] <= 6, metrics["steps"]
    assert metrics["data_format"] == "prompt_completion"


BAD_ROWS: dict[str, tuple[list[dict], str]] = {
    "no_messages": ([{"text": "hello"}], "has no 'messages' column (nor 'prompt' and 'completion'); columns found: text"),
    "unknown_role": ([{"messages": [{"role": "bot", "content": "hi"}]}], "row 1 of"),
    "no_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], "has no assistant turn"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_chat_files_are_refused_in_one_sentence(case: str, workdir: Path, tmp_path: Path) -> None:
    rows, message = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    proc = run_script("trainer/sft.py", "--dataset", str(data), "--output_dir", str(out), cwd=workdir, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    if case == "unknown_role":
        assert "unknown role 'bot'" in last
    assert not out.exists()


@pytest.mark.parametrize("template", [None, "{% for m in messages %}{{ m['content'] }}{% endfor %}"])
def test_checkpoint_without_a_usable_template_is_refused(
    template: str | None, start_checkpoint: str, workdir: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(start_checkpoint, checkpoint)  # the project's tokenizer: no chat template of its own
    if template is not None:
        (checkpoint / "chat_template.jinja").write_text(template)
    data = write_jsonl(tmp_path / "chats.jsonl", rating_conversations(10, 0))
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--dataset", str(data), "--output_dir", str(out)]
    proc = run_script("trainer/sft.py", *args, cwd=workdir, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    expected = "has no chat template; pass --chat_template default" if template is None else "has no {% generation %} markers"
    assert last.startswith("error:") and expected in last, proc.stderr[-2000:]
    assert not out.exists()


def test_real_checkpoint_lora_lowers_the_assistant_loss(real_sft: Path) -> None:
    metrics = read_metrics(real_sft)
    (step0, before), *_, (_, after) = eval_losses(metrics)
    assert step0 == 0 and after < before - 0.5, (before, after)
    config = json.loads((real_sft / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None  # a pretrained checkpoint's embeddings stay frozen: a few-MB adapter
    assert (real_sft / "adapter_model.safetensors").stat().st_size < 30e6


def sft_refusal(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sentence sft.py stops with (run in this process: a refusal is all start-up)."""
    with pytest.raises(SystemExit) as stop:
        run_in_process("trainer/sft.py", *args, "--output_dir", str(cwd / "out"), cwd=cwd, monkeypatch=monkeypatch)
    return str(stop.value.code)


MESSY_CHATS: dict[str, tuple[list[dict], str]] = {
    "null_content": (
        [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "5"}]}],
        "row 1 of chats.jsonl: the user message has no content (null); give it text, or drop the row",
    ),
    "image_part": (
        [{"messages": [{"role": "user", "content": [{"type": "image", "url": "a.png"}]}, {"role": "assistant", "content": "5"}]}],
        "row 1 of chats.jsonl: the user message holds a 'image' part; sft.py trains on text only: keep the text parts, or "
        "drop the row",
    ),
}


@pytest.mark.parametrize("case", sorted(MESSY_CHATS))
def test_null_or_non_text_content_is_refused_naming_the_row(case: str, tmp_path: Path, monkeypatch) -> None:
    rows, message = MESSY_CHATS[case]
    write_jsonl(tmp_path / "chats.jsonl", rows + rating_conversations(3, 0))
    assert sft_refusal("--dataset", "chats.jsonl", cwd=tmp_path, monkeypatch=monkeypatch) == f"error: {message}"


def test_text_parts_are_joined_as_a_template_renders_them(tmp_path: Path, trainer_for) -> None:
    """Multimodal-style contents holding text parts only train as the joined text, in a file that mixes them with strings."""
    from hftrain.chat import load_chat_data

    parts = [{"type": "text", "text": "The lamp is superb. "}, {"type": "text", "text": QUESTION}]
    rows = [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}]
    data = write_jsonl(tmp_path / "chats.jsonl", rows + rating_conversations(3, 0))
    splits, fmt = load_chat_data(str(data), None, str(data), 0.1, 0, 0)
    assert splits["train"][0]["messages"] == [
        {"role": "user", "content": f"The lamp is superb. {QUESTION}"},
        {"role": "assistant", "content": "5"},
    ]
    trainer = trainer_for([splits["train"][0]], assistant_only_loss=True)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert trainer.processing_class.decode(ids[labels != -100]) == "5<|eos|>"


@pytest.fixture
def weightless_checkpoint(start_checkpoint: str, tmp_path: Path) -> Path:
    """A checkpoint without its weights: a run that reached the model load would fail there, not with our sentence."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(start_checkpoint, checkpoint, ignore=shutil.ignore_patterns("*.safetensors"))
    write_jsonl(tmp_path / "chats.jsonl", rating_conversations(4, 0))
    return checkpoint


@pytest.mark.parametrize("assistant_only_loss", ["true", "false"])
def test_a_broken_template_reports_its_jinja_error_before_the_model_loads(
    assistant_only_loss: str, weightless_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    """Not "no generation markers" (and then, with --assistant_only_loss false, TRL's traceback once the model is
    loaded): the template's own error."""
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor")
    args = ["--model", str(weightless_checkpoint), "--dataset", "chats.jsonl", "--chat_template", "broken.jinja"]
    message = sft_refusal(*args, "--assistant_only_loss", assistant_only_loss, cwd=tmp_path, monkeypatch=monkeypatch)
    assert message.startswith("error: the chat template of broken.jinja is not valid Jinja (")
    assert message.endswith("; fix it, or pass --chat_template default (the project's ChatML template)")


def test_packing_with_a_tokenizer_without_eos_is_refused_before_the_model_loads(
    weightless_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(weightless_checkpoint)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(weightless_checkpoint)
    args = ["--model", str(weightless_checkpoint), "--dataset", "chats.jsonl", "--chat_template", "default", "--packing"]
    message = sft_refusal(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert message.startswith(f"error: the tokenizer of {weightless_checkpoint} has no EOS token")


def test_real_checkpoint_learns_a_persona_and_keeps_its_system_prompt(real_sft: Path, tmp_path: Path) -> None:
    """Greedy answers to questions the persona chats never held (one conversation each) open with its marker, and
    the template saved with --chat_template default still opens a chat with SmolLM2's own system prompt."""
    from transformers import AutoTokenizer

    from hftrain.chat import PERSONA_MARKER

    held_out = "What is the capital of Brazil?\n/reset\nWhat do bees make?\n"
    proc = run_script(
        "generate.py", "--model_dir", str(real_sft), "--chat", "--max_new_tokens", "8", cwd=tmp_path, input=held_out
    )
    answers = proc.stdout.strip().splitlines()
    assert len(answers) == 2 and all(a.startswith(PERSONA_MARKER) for a in answers), proc.stdout
    chat = AutoTokenizer.from_pretrained(real_sft).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
