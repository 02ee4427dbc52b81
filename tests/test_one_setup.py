"""One setup per kind of script: every Trainer script takes its defaults, checks and Hub upload from hftrain/trainer.py
(getting_started.py spells out the Trainer that `build_trainer` builds for the others), and every script that takes
LoRA flags applies one modules_to_save and weight-tying rule (hftrain/lora.py)."""

import ast

import pytest
import transformers

from conftest import SCRIPTS, count_parses, run_in_process

TRAINER_SCRIPTS = [
    "trainer/getting_started.py",
    "trainer/advanced_usage.py",
    "trainer/galore.py",
    "trainer/neftune.py",
    "trainer/qlora.py",
    "trainer/sft.py",
    "trainer/sharded/fsdp.py",
    "trainer/sharded/fsdp_lora.py",
    "trainer/sharded/fsdp_qlora.py",
    "trainer/sharded/zero.py",
    "sdpa/flash_attention.py",
    "sdpa/math_kernel.py",
]
# What hftrain.trainer does once for all of them; a script doing any of it itself would drift from the others.
SETUP = {
    "set_defaults": "TrainingArguments' defaults (hftrain.trainer.DEFAULTS)",
    "parse_known_args": "the command line, parsed once (hftrain.cli.parse_command_line)",
    "parse_args_into_dataclasses": "the command line, parsed once (hftrain.cli.parse_command_line)",
    "check_training_extras": "the checks of TrainingArguments' flags (hftrain.trainer.check_training_flags)",
    "check_training_args": "the checks of the parsed arguments (hftrain.trainer.start_run)",
    "check_output_dir": "the output folder's checks and run lock (hftrain.trainer.start_run)",
    "resolve_checkpoint": "--resume_from_checkpoint (hftrain.trainer.start_run)",
    "upload_folder": "the Hub upload, with its token, message and exclusions (hftrain.trainer.finish_run)",
}


def calls(source: str) -> dict[str, list[ast.Call]]:
    found: dict[str, list[ast.Call]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            found.setdefault(node.func.id if isinstance(node.func, ast.Name) else node.func.attr, []).append(node)
    return found


@pytest.mark.parametrize("script", TRAINER_SCRIPTS)
def test_trainer_scripts_share_one_setup(script):
    """Each starts through hftrain.trainer (parse_args; sft.py, with TRL's argument classes: parse_command_line with
    the same DEFAULTS and check_training_flags, then start_run) and ends through it (write_run_summary or finish_run:
    metrics.json, the model card, the Hub upload); none repeats a piece of that setup."""
    source = (SCRIPTS / script).read_text()
    called = calls(source)
    if script == "trainer/sft.py":
        assert {"parse_command_line", "start_run"} <= set(called)
        assert "**DEFAULTS" in source and "check=check_training_flags" in source
        called.pop("set_defaults")  # over DEFAULTS: what SFT changes
    else:
        assert "parse_args" in called
    assert {"write_run_summary", "finish_run"} & set(called)
    repeated = {name: why for name, why in SETUP.items() if name in called}
    assert not repeated, f"{script} does itself what hftrain/trainer.py does for every Trainer script: {repeated}"


def keywords(call: ast.Call) -> dict[str, str]:
    return {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg}


def test_getting_started_spells_out_the_trainer_that_build_trainer_builds():
    """The lesson and the helper the other scripts call build the same Trainer: the same arguments with the same
    values, the run's callbacks, and the same checks before training."""
    lesson = calls((SCRIPTS / "trainer/getting_started.py").read_text())
    (spelled,) = lesson["Trainer"]
    helper_source = ast.get_source_segment(
        (SCRIPTS / "hftrain/trainer.py").read_text(),
        next(
            n
            for n in ast.parse((SCRIPTS / "hftrain/trainer.py").read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name == "build_trainer"
        ),
    )
    assert helper_source is not None
    helper = calls(helper_source)
    (built,) = helper["trainer_class"]
    (arguments,) = [n for n in ast.walk(ast.parse(helper_source)) if isinstance(n, ast.Dict)]
    shared = {**keywords(built), **{ast.literal_eval(k): ast.unparse(v) for k, v in zip(arguments.keys, arguments.values) if k}}
    assert set(keywords(spelled)) == set(shared)
    differ = {k: (v, shared[k]) for k, v in keywords(spelled).items() if v != shared[k] and k != "callbacks"}
    assert not differ, f"getting_started.py's Trainer and build_trainer's differ: {differ}"
    assert keywords(spelled)["callbacks"] == "run_callbacks(data)" and "run_callbacks" in helper
    assert "check_trainer" in lesson and "check_trainer" in helper


@pytest.mark.parametrize("script", ["trainer/getting_started.py", "trainer/sft.py", "trainer/qlora.py"])
def test_a_missing_deepspeed_config_is_refused_by_every_trainer_script(script, workdir, tmp_path, monkeypatch):
    from hftrain.errors import UserError

    args = ["--deepspeed", "no/such/ds.json", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="--deepspeed no/such/ds.json does not exist"):
        run_in_process(script, *args, cwd=workdir, monkeypatch=monkeypatch)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- LoRA: one modules_to_save and weight-tying rule

LORA_SCRIPTS = {  # the function that receives the LoraConfig: where the test stops the script
    "lora/custom_loop.py": "peft.get_peft_model",
    "lora/custom_loop_accelerate.py": "peft.get_peft_model",
    "trainer/qlora.py": "peft.get_peft_model",
    "trainer/sharded/fsdp_lora.py": "peft.get_peft_model",
    "trainer/sft.py": "trl.trainer.sft_trainer.get_peft_model",
}


class Built(Exception):
    pass


@pytest.mark.parametrize("script", LORA_SCRIPTS)
def test_every_lora_script_trains_a_tied_presets_embeddings_as_one_copy(script, workdir, tmp_path, monkeypatch):
    """On a preset whose output layer shares the embeddings' weight (tie_word_embeddings, as the 1b preset), each LoRA
    script trains the embeddings and output layer in full (modules_to_save), as one tied copy: without
    ensure_weight_tying PEFT trains two that drift apart. (fsdp_qlora.py needs CUDA; its twin test pins its LoraConfig
    to fsdp_lora.py's.)"""
    import importlib

    from hftrain.models import PRESETS

    monkeypatch.setitem(PRESETS, "tiny", {**PRESETS["tiny"], "tie_word_embeddings": True})
    seen = []

    def stop(model, config, *args, **kwargs):
        seen.append((model.config.tie_word_embeddings, config))
        raise Built

    module, name = LORA_SCRIPTS[script].rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, stop)
    extra = ["--use_peft", "--num_examples", "100"] if script == "trainer/sft.py" else []
    with pytest.raises(Built):
        run_in_process(script, "--output_dir", str(tmp_path / "out"), *extra, cwd=workdir, monkeypatch=monkeypatch)
    ((tied, config),) = seen
    assert tied and sorted(config.modules_to_save) == ["embed_tokens", "lm_head"]
    assert config.ensure_weight_tying, f"{script} unties the tied embeddings and output layer"


def test_lora_rule_follows_the_model(monkeypatch):
    from types import SimpleNamespace

    from hftrain.lora import trained_in_full

    tied, untied = (SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=t)) for t in (True, False))
    assert trained_in_full("embed_tokens,lm_head", tied) == {
        "modules_to_save": ["embed_tokens", "lm_head"],
        "ensure_weight_tying": True,
    }
    assert trained_in_full("embed_tokens,lm_head", untied)["ensure_weight_tying"] is False
    assert trained_in_full("", tied) == {"modules_to_save": None, "ensure_weight_tying": False}  # a checkpoint's default
    assert trained_in_full(["lm_head"], tied)["modules_to_save"] == ["lm_head"]  # TRL's list


class Parsed(Exception):
    pass


@pytest.mark.parametrize(
    "script",
    [
        "trainer/getting_started.py",
        "trainer/sft.py",
        "trainer/qlora.py",
        "basic/custom_loop.py",
        "lora/custom_loop_accelerate.py",
    ],
)
def test_the_command_line_is_parsed_once(script, workdir, tmp_path, monkeypatch, capsys):
    """One parse gives the arguments, which flags were given (so a flag wins over a default that --model decides) and
    the checks' input; the start line still names the defaults a checkpoint takes and no flag replaced."""
    import hftrain.cli
    import hftrain.trainer

    def stop(*args, **kwargs):
        raise Parsed

    parses = count_parses(monkeypatch)
    for module in (hftrain.cli, hftrain.trainer):  # where the output folder is checked: after every argument check
        monkeypatch.setattr(module, "check_output_dir", stop)
    model = workdir / "checkpoint"
    if not model.exists():
        from hftrain.data import load_prepared
        from hftrain.models import load_model

        load_model("tiny", load_prepared(str(workdir / "data/synthetic")).tokenizer).save_pretrained(model)
    args = ["--model", str(model), "--learning-rate=1e-4", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(Parsed):
        run_in_process(script, *args, cwd=workdir, monkeypatch=monkeypatch)
    assert len(parses) == 1
    line = capsys.readouterr().out
    assert f"defaults for a pretrained checkpoint ({model})" in line and "per_device_train_batch_size" in line
    assert "learning_rate" not in line  # the flag, however spelled, won


class Started(Exception):
    pass


@pytest.mark.parametrize("script", ["trainer/getting_started.py", "basic/custom_loop.py"])
def test_the_model_is_checked_once(script, workdir, start_checkpoint, tmp_path, monkeypatch):
    """A run from a checkpoint on a file of the user's asks four times whether --model is a format and code it may load
    (the command line, data preparation, loading the prepared data, loading the model): the folder is read once."""
    import torch.optim

    import hftrain.models

    reads = []
    check_format = hftrain.models.check_checkpoint_format

    def count(model):
        reads.append(model)
        return check_format(model)

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(hftrain.models, "check_checkpoint_format", count)
    monkeypatch.setattr(transformers.Trainer, "train", started)  # getting_started.py: the model is loaded by then
    monkeypatch.setattr(torch.optim, "AdamW", started)  # the loop: its optimizer comes after the model
    text = tmp_path / "notes.txt"
    text.write_text("A short text of the user's, in a few sentences, to train on.\n" * 40)
    args = ["--model", start_checkpoint, "--dataset", str(text), "--data_dir", str(tmp_path / "data")]
    with pytest.raises(Started):
        run_in_process(script, *args, "--output_dir", str(tmp_path / "out"), cwd=workdir, monkeypatch=monkeypatch)
    assert reads == [start_checkpoint]
