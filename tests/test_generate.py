"""scripts/generate.py: text from a full model, from an adapter on its base (relative, absolute base paths) and from
the merged model, the same greedy text from the last two; the chat template with --chat; bad input refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_script
from hftrain.chat import DEFAULT_CHAT_TEMPLATE, rating_conversations
from hftrain.data import load_prepared
from hftrain.models import load_model


def generate(model_dir: Path, *args: str, cwd: Path, **kwargs):
    return run_script("generate.py", "--model_dir", str(model_dir), *args, cwd=cwd, **kwargs)


def merge(adapter: Path, out: Path) -> Path:
    """What a user runs to ship one folder: PEFT folds the adapter into the base weights."""
    from peft import PeftModel

    base = adapter / json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]  # relative to it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_adapter(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base and a LoRA adapter with random (non-zero) B matrices, so that the adapter changes the output."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gen")
    tokenizer = load_prepared(str(workdir / "data/synthetic")).tokenizer
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    base = load_model("tiny", tokenizer)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    config_path = root / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../base"  # relative to the adapter folder, as a shareable output names it
    config_path.write_text(json.dumps(config))
    return root / "adapter"


def test_adapter_and_merged_model_generate_the_same_text(tiny_adapter: Path, workdir: Path, tmp_path: Path) -> None:
    prompt = ["--prompt", "The kettle arrived today.", "--max_new_tokens", "12"]
    from_adapter = generate(tiny_adapter, *prompt, cwd=tmp_path).stdout  # another cwd: the base resolves from the adapter
    merged = merge(tiny_adapter, tmp_path / "merged")
    assert generate(merged, *prompt, cwd=workdir).stdout == from_adapter
    from_base = generate(tiny_adapter.parent / "base", *prompt, cwd=workdir).stdout
    assert from_adapter.strip() and from_base != from_adapter  # the adapter was applied, not just the base

    moved = tmp_path / "absolute"
    shutil.copytree(tiny_adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_adapter.parent / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert generate(moved, *prompt, cwd=workdir).stdout == from_adapter

    sampled = generate(merged, *prompt, "--temperature", "1.0", "--top_p", "0.9", cwd=workdir).stdout
    assert sampled.strip()


def test_chat_answers_with_the_fine_tuned_model(sft_tiny: Path, workdir: Path) -> None:
    chats = rating_conversations(5, 11)
    answers = [
        generate(sft_tiny, "--chat", "--prompt", c["messages"][0]["content"], cwd=workdir).stdout.strip() for c in chats[:2]
    ]
    assert all(a in ("1", "2", "3", "4", "5") for a in answers), answers  # the digit, then the EOS token stops it


def test_bad_input(tiny_adapter: Path, start_checkpoint: str, tmp_path: Path) -> None:
    def error(*args: str) -> str:
        proc = run_script("generate.py", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    assert "has no chat template" in error("--model_dir", start_checkpoint, "--prompt", "hi", "--chat")
    (tmp_path / "empty").mkdir()
    assert "holds no model" in error("--model_dir", str(tmp_path / "empty"), "--prompt", "hi")
    lost = tmp_path / "lost"
    shutil.copytree(tiny_adapter, lost / "adapter")  # its ../base is not beside the copy
    assert "base model ../base does not exist" in error("--model_dir", str(lost / "adapter"), "--prompt", "hi")


def test_real_checkpoint_adapter_and_merged_model_answer(real_sft: Path, tmp_path: Path) -> None:
    prompt = ["--chat", "--prompt", "I bought this lamp last month. The build is superb. Rating?", "--max_new_tokens", "8"]
    from_adapter = generate(real_sft, *prompt, cwd=tmp_path).stdout
    merged = merge(real_sft, tmp_path / "merged")
    assert from_adapter.strip() and generate(merged, *prompt, cwd=tmp_path).stdout == from_adapter


def test_repetition_settings_reach_generate(tiny_adapter: Path, workdir: Path) -> None:
    """--repetition_penalty and --no_repeat_ngram_size: the script prints what model.generate gives with them, which
    is not the greedy text (a random tiny model repeats itself)."""
    base = tiny_adapter.parent / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    inputs = tokenizer("The kettle arrived today.", return_tensors="pt")

    def expected(**settings) -> str:
        ids = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id, **settings)
        return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    flags = ["--repetition_penalty", "1.3", "--no_repeat_ngram_size", "3"]
    out = generate(base, "--prompt", "The kettle arrived today.", "--max_new_tokens", "24", *flags, cwd=workdir).stdout
    want = expected(repetition_penalty=1.3, no_repeat_ngram_size=3)
    assert out.strip() == want.strip() and want != expected(), (out, want)


def test_chat_keeps_the_history_until_reset(tiny_adapter: Path, workdir: Path) -> None:
    """Prompts from stdin are one conversation: the second answer to the same message differs (it sees the first
    turn), and after /reset the answer is the first one again."""
    base = tiny_adapter.parent / "base"  # the project's ChatML template
    chat = ["--chat", "--max_new_tokens", "8"]
    once = generate(base, *chat, cwd=workdir, input="The kettle is superb.\n").stdout
    twice = generate(base, *chat, cwd=workdir, input="The kettle is superb.\nThe kettle is superb.\n").stdout
    reset = generate(base, *chat, cwd=workdir, input="The kettle is superb.\n/reset\nThe kettle is superb.\n")
    assert once.strip() and twice.startswith(once) and twice != once * 2
    assert reset.stdout == once * 2 and "a new conversation" in reset.stderr


def test_model_and_input_checks_as_in_training(tiny_adapter: Path, start_checkpoint: str, tmp_path: Path) -> None:
    """What the training scripts refuse in one sentence, generate.py and evaluate_model.py refuse alike."""

    def error(script: str, model: str | Path, *args: str) -> str:
        proc = run_script(script, "--model_dir", str(model), *args, cwd=tmp_path, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()[-1]

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(start_checkpoint, folder)
        change(folder)
        return folder

    corrupt = broken("corrupt-config", lambda f: (f / "config.json").write_text('{"model_type": "llama", '))
    truncated = broken("truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]))
    no_tokenizer = broken("no-tokenizer", lambda f: (f / "tokenizer_config.json").unlink())

    def bigger_vocabulary(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["vocab_size"] = 64  # the tokenizer has more tokens than the model has embeddings
        (folder / "config.json").write_text(json.dumps(config))

    mismatch = broken("vocab", bigger_vocabulary)
    hi = ["--prompt", "hi"]
    text = tmp_path / "text.txt"
    text.write_text("The kettle arrived today. " * 20)
    for script, args in (("generate.py", hi), ("evaluate_model.py", ["--eval_file", str(text)])):
        assert "config.json" in error(script, corrupt, *args)
        assert "model.safetensors" in error(script, truncated, *args) or "SafetensorError" in error(script, truncated, *args)
        assert "holds no tokenizer" in error(script, no_tokenizer, *args)
        assert "only 64 embeddings" in error(script, mismatch, *args)
        assert "could not load 'nobody/no-such-model' from the Hugging Face Hub" in error(script, "nobody/no-such-model", *args)
    assert "--prompt is empty" in error("generate.py", start_checkpoint, "--prompt", "")
    assert "--batch_size is 0" in error("evaluate_model.py", start_checkpoint, "--batch_size", "0")
    assert "--eval_file missing.txt does not exist" in error("evaluate_model.py", start_checkpoint, "--eval_file", "missing.txt")
