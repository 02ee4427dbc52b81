"""scripts/trainer/dpo.py, reward_model.py and grpo.py: after a short SFT start each raises what it should on the
rating task (held-out greedy accuracy for DPO and GRPO, pair accuracy for the reward model), DPO runs under DDP, a real
checkpoint learns from preferences, from a user's reward file and as a reward model, and bad input stops before
training with one sentence."""

import json
import runpy
from pathlib import Path

import pytest
from trl import DPOTrainer, GRPOTrainer, RewardTrainer  # noqa: F401  (imported once here, not by each forked run below)

from conftest import accelerate_cpu, count_parses, read_metrics, run_in_process, run_script, shared_dir
from hftrain.chat import QUESTION
from hftrain.preference import rating_preferences, rating_prompts
from hftrain.task import make_reviews


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def pref_start(tmp_path_factory: pytest.TempPathFactory, workdir: Path) -> Path:
    """The start the scripts' default makes for the tiny preset (--sft_start_steps 60: 60 SFT steps of 32 rating
    chats at 3e-3), made once with sft.py and shared by the runs below."""
    out, lock = shared_dir(tmp_path_factory, "pref-start")
    with lock:
        if not (out / "model.safetensors").exists():
            args = ["--max_steps", "60", "--warmup_steps", "10", "--learning_rate", "3e-3", "--num_examples", "2100"]
            args += ["--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no", "--output_dir", str(out)]
            run_script("trainer/sft.py", *args, "--report_to", "none", cwd=workdir)
    return out


def run_from_start(script: str, start: Path, out: Path, workdir: Path, *args: str) -> dict:
    """A default run of `script` from the shared SFT start (the preset's learning rate given: the start is a folder,
    which would otherwise get a pretrained checkpoint's gentle one)."""
    run_script(f"trainer/{script}", "--model", str(start), "--output_dir", str(out), "--report_to", "none", *args, cwd=workdir)
    return read_metrics(out)


def test_dpo_default_raises_greedy_accuracy(pref_start: Path, workdir: Path, tmp_path: Path) -> None:
    args = ["--learning_rate", "1e-3", "--max_steps", "50", "--num_examples", "1700", "--eval_steps", "25"]
    m = run_from_start("dpo.py", pref_start, tmp_path / "dpo", workdir, *args)
    # 50 steps from sft.py's start (the default takes 150 from its own and gains 0.5): measured 0.41 -> 0.47
    assert m["eval_accuracy"] >= m["eval_accuracy_before"] + 0.04, (m["eval_accuracy_before"], m["eval_accuracy"])
    assert m["eval_rewards/accuracies"] > 0.6 and m["eval_rewards/margins"] > 0, m
    assert (tmp_path / "dpo/training_curves.png").exists() and "DPO" in (tmp_path / "dpo/README.md").read_text()


def test_grpo_default_raises_greedy_accuracy_and_reward(pref_start: Path, workdir: Path, tmp_path: Path) -> None:
    args = ["--learning_rate", "1e-3", "--max_steps", "60", "--num_examples", "600", "--logging_steps", "5"]
    m = run_from_start("grpo.py", pref_start, tmp_path / "grpo", workdir, *args)
    rewards = [row["reward"] for row in m["log_history"] if "reward" in row]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards  # the sampled answers' mean reward rises
    assert m["eval_accuracy"] >= m["eval_accuracy_before"], (m["eval_accuracy_before"], m["eval_accuracy"])
    assert m["generation_tokens"] > 0 and m["generation_tokens_per_second"] > 0


def test_reward_model_default_orders_held_out_pairs(pref_start: Path, workdir: Path, tmp_path: Path) -> None:
    args = ["--learning_rate", "3e-4", "--max_steps", "50", "--num_examples", "1500", "--eval_steps", "25"]
    m = run_from_start("reward_model.py", pref_start, tmp_path / "rm", workdir, *args)
    # measured from the default's own start: 0.31 -> 0.78 after 50 steps
    assert m["eval_accuracy"] >= 0.7 and m["eval_accuracy"] > m["eval_accuracy_before"] + 0.15, m
    # The saved folder is a reward GRPO takes: a sequence classifier with the tokenizer and its chat template.
    config = json.loads((tmp_path / "rm/config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and (tmp_path / "rm/chat_template.jinja").exists()


def test_rating_reward_credits_near_misses_a_little_and_malformed_answers_not_at_all() -> None:
    rating_reward = runpy.run_path(str(Path(__file__).parents[1] / "scripts/trainer/grpo.py"))["rating_reward"]
    answers = ["3", " 3 ", "4", "5", "1", " 3 3 3", "three", ""]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    assert rating_reward(completions, ["3"] * len(answers)) == pytest.approx([1, 1, 0.2, 0.1, 0.1, 0, 0, 0])
    assert rating_reward(["1"], ["5"]) == [0.0]  # text completions too; four stars off earns nothing


def test_dpo_ddp_two_processes_from_the_preset(workdir: Path, tmp_path: Path) -> None:
    """The default path itself (the preset, its SFT start made by both processes together, then DPO) over gloo."""
    out = tmp_path / "ddp"
    args = ["--sft_start_steps", "10", "--max_steps", "6", "--num_examples", "400", "--eval_steps", "3"]
    args += ["--per_device_train_batch_size", "16", "--output_dir", str(out), "--report_to", "none"]
    accelerate_cpu("trainer/dpo.py", *args, cwd=workdir)
    m = read_metrics(out)
    assert m["num_devices"] == 2 and m["steps"] == 6 and (out / "sft_start/model.safetensors").exists()
    assert "eval_rewards/accuracies" in m and "eval_accuracy_before" in m


# Bad input: one sentence, before training (each a forked run that stops at its check).

PAIRS = rating_preferences(8, 0)


def refused(script: str, workdir: Path, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "out"
    proc = run_script(f"trainer/{script}", *args, "--output_dir", str(out), cwd=workdir, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-2000:]
    assert not (out / "metrics.json").exists() and not (out / "sft_start").exists()
    return last


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "chosen": "b"}] * 4, "has no 'rejected' column"),
        ([{"text": "a"}] * 4, "has no 'chosen' and no 'rejected' column"),
        ([{**p, "rejected": p["chosen"]} for p in PAIRS], "'chosen' is identical to 'rejected'"),
        ([PAIRS[0], {**PAIRS[1], "prompt": [{"role": "user", "content": ""}]}, *PAIRS[2:]], "row 2 of"),
    ],
    ids=["no_rejected", "no_columns", "chosen_is_rejected", "empty_prompt"],
)
def test_dpo_refuses_bad_rows(rows: list, message: str, workdir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert message in refused("dpo.py", workdir, tmp_path, "--dataset", str(data))


def test_conversational_rows_need_a_chat_template(start_checkpoint: str, workdir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    last = refused("dpo.py", workdir, tmp_path, "--model", start_checkpoint, "--dataset", str(data))
    assert "has no chat template; pass --chat_template default" in last


REWARDS = """
def right(completions, rating, **kwargs):
    return [1.0 for _ in completions]

def fails(completions, rating, **kwargs):
    return [1 / (r != "3") for r in rating]

def short(completions, **kwargs):
    return [0.0]
"""


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.py:right", "the file missing.py does not exist"),
        ("rewards.py:nothing", "has no function nothing (functions there: right, fails, short)"),
        ("nonsense", "is not a reward: give one of rating_reward"),
        ("rewards.py:fails", "the reward function fails raised ZeroDivisionError"),
        ("rewards.py:short", "the reward function short returned 1 values for rows 1-8"),
    ],
    ids=["no_file", "no_function", "unknown", "raises", "wrong_count"],
)
def test_grpo_refuses_bad_rewards(spec: str, message: str, workdir: Path, tmp_path: Path) -> None:
    (workdir / "rewards.py").write_text(REWARDS)
    last = refused("grpo.py", workdir, tmp_path, "--num_examples", "40", "--reward_funcs", spec)
    assert message in last
    if spec.endswith("fails"):  # the first row whose rating is 3, named
        first = next(i for i, row in enumerate(rating_prompts(36, 42)) if row["rating"] == "3")
        assert f"on row {first + 1} of the training data" in last


def test_grpo_refuses_a_reward_model_that_is_no_classifier(start_checkpoint: str, workdir: Path, tmp_path: Path) -> None:
    last = refused("grpo.py", workdir, tmp_path, "--reward_funcs", start_checkpoint)
    assert "is not a sequence classifier (LlamaForCausalLM)" in last


def test_grpo_refuses_num_generations_that_do_not_divide_the_batch(workdir: Path, tmp_path: Path) -> None:
    last = refused("grpo.py", workdir, tmp_path, "--num_generations", "3", "--per_device_train_batch_size", "8")
    assert "--num_generations 3 does not divide the generation batch of 8 completions" in last


def test_grpo_refuses_rows_without_prompt_and_empty_prompts(workdir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "rating": "1"}] * 4)
    assert "has no 'prompt' column" in refused("grpo.py", workdir, tmp_path, "--dataset", str(data))
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "rating": "1"}, {"prompt": " ", "rating": "2"}] * 2)
    assert "row 2 of" in refused("grpo.py", workdir, tmp_path, "--dataset", str(data))


# A real checkpoint (SmolLM2-135M-Instruct): LoRA, a few steps, short rows.


def real_pairs(n: int, seed: int) -> list[dict]:
    """Rating pairs whose rejected answer is far from the right one (two stars or more): a preference a small
    pretrained model can pick up in a few steps."""
    rows = []
    for review in make_reviews(n, seed):
        text, rating = review.rsplit(" Rating:", 1)
        right = int(rating)
        wrong = 1 if right >= 3 else 5
        prompt = [{"role": "user", "content": f"{text}\n{QUESTION} Answer 1 to 5."}]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": str(right)}],
                "rejected": [{"role": "assistant", "content": str(wrong)}],
            }
        )
    return rows


@pytest.fixture(scope="module")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real")
    write_jsonl(path / "train.jsonl", real_pairs(48, 0))
    write_jsonl(path / "test.jsonl", real_pairs(16, 1))
    return path


# Short rows, few steps, the held-out pairs 8 at a time: a 135M model on a 2-core CPU.
REAL = ["--max_length", "128", "--warmup_steps", "0", "--per_device_eval_batch_size", "8", "--report_to", "none"]
REAL += ["--eval_strategy", "no", "--eval_on_start", "false"]


def real_pairs_args(real_checkpoint: Path, real_data: Path, out: Path) -> list[str]:
    files = ["--dataset", str(real_data / "train.jsonl"), "--eval_dataset", str(real_data / "test.jsonl")]
    return ["--model", str(real_checkpoint), *files, *REAL, "--output_dir", str(out)]


def test_real_checkpoint_dpo_lora(real_checkpoint: Path, real_data: Path) -> None:
    out = real_data / "dpo"
    # DPO alone (--loss_type sigmoid): with the default's added NLL term the margin moved little in 6 steps (measured:
    # held-out reward accuracy 0.44, margin +0.02); 4 pairs a step keeps a 49k-token vocabulary's logits small
    args = ["--use_peft", "--loss_type", "sigmoid", "--max_steps", "8", "--per_device_train_batch_size", "4"]
    args += ["--learning_rate", "1e-3"]
    run_script("trainer/dpo.py", *real_pairs_args(real_checkpoint, real_data, out), *args, cwd=real_data)
    m = read_metrics(out)
    assert m["eval_rewards/accuracies"] > 0.5 and m["eval_rewards/margins"] > 0, m
    assert (out / "adapter_config.json").exists()


def test_real_checkpoint_reward_model(real_checkpoint: Path, real_data: Path) -> None:
    out = real_data / "rm"
    args = ["--max_steps", "6", "--per_device_train_batch_size", "8", "--learning_rate", "1e-4"]
    run_script("trainer/reward_model.py", *real_pairs_args(real_checkpoint, real_data, out), *args, cwd=real_data)
    assert read_metrics(out)["eval_accuracy"] > 0.5


USER_REWARD = '''
import re

def digit_first(completions, rating, **kwargs):
    """1 when the answer starts with the right rating, 0.5 with another digit, 0 otherwise."""
    out = []
    for completion, right in zip(completions, rating):
        text = completion[-1]["content"].strip()
        out.append(1.0 if text.startswith(right) else 0.5 if re.match("[1-5]", text) else 0.0)
    return out
'''


def test_real_checkpoint_grpo_user_reward_raises_the_mean_reward(real_checkpoint: Path, real_data: Path) -> None:
    rows = [{"prompt": p["prompt"], "rating": p["chosen"][0]["content"]} for p in real_pairs(64, 2)]
    write_jsonl(real_data / "prompts.jsonl", rows)
    (real_data / "user_rewards.py").write_text(USER_REWARD)
    out = real_data / "grpo"
    data = ["--dataset", str(real_data / "prompts.jsonl"), "--reward_funcs", "user_rewards.py:digit_first"]
    args = ["--model", str(real_checkpoint), *data, "--use_peft", "--max_steps", "8", "--per_device_train_batch_size", "16"]
    args += ["--num_generations", "4", "--max_completion_length", "6", "--learning_rate", "2e-4", "--logging_steps", "1"]
    args += ["--output_dir", str(out), "--report_to", "none"]
    run_script("trainer/grpo.py", *args, cwd=real_data)
    m = read_metrics(out)
    rewards = [row["reward"] for row in m["log_history"] if "reward" in row]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards


@pytest.mark.parametrize("script", ["dpo.py", "reward_model.py", "grpo.py"])
def test_output_dir_that_is_the_model_folder_is_refused(script: str, workdir: Path, start_checkpoint: str) -> None:
    """As in the other training scripts: the run would write over the checkpoint it starts from."""
    weights = Path(start_checkpoint, "model.safetensors").read_bytes()
    args = ["--model", start_checkpoint, "--output_dir", start_checkpoint, "--overwrite_output_dir", "--max_steps", "1"]
    proc = run_script(f"trainer/{script}", *args, cwd=workdir, check=False)
    assert proc.returncode == 1 and f"--output_dir {start_checkpoint} is --model {start_checkpoint} itself" in proc.stderr
    assert Path(start_checkpoint, "model.safetensors").read_bytes() == weights


class Parsed(Exception):
    pass


@pytest.mark.parametrize("script", ["dpo.py", "reward_model.py", "grpo.py"])
def test_the_command_line_is_parsed_once(
    script: str, workdir: Path, start_checkpoint: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """One parse gives the arguments and which flags were given: a flag (however spelled) wins over the learning rate
    a checkpoint takes, and the start line names only the defaults the run takes."""
    import hftrain.preference

    def stop(*args, **kwargs):
        raise Parsed

    parses = count_parses(monkeypatch)
    monkeypatch.setattr(hftrain.preference, "check_run", stop)
    args = ["--model", start_checkpoint, "--use_peft", "--learning-rate=1e-4", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(Parsed):
        run_in_process(f"trainer/{script}", *args, cwd=workdir, monkeypatch=monkeypatch)
    assert len(parses) == 1
    line = capsys.readouterr().out
    assert f"defaults for a pretrained checkpoint ({start_checkpoint}): modules_to_save none" in line, line
    assert "learning_rate" not in line
