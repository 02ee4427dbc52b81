"""Sharded examples on CPU: ZeRO-3 with 2 processes under both launchers, the FSDP scripts'
code path in one process, and every config file checked against the model it is meant for."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, SCRIPTS, assert_twins, free_port, read_metrics, run, run_script, train_losses

SHORT = ["--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "10"]


def from_start(start_checkpoint: str, out: Path, *args: str) -> list[str]:
    """What every ZeRO-3 comparison run shares: the saved random start, no evaluation or saves between steps."""
    # random weights saved as a checkpoint: the preset's learning rate, not a checkpoint's 5e-5
    return ["--model", start_checkpoint, "--learning_rate", "3e-3", *SHORT, "--output_dir", str(out), *args]


# zero.py on 2 CPU processes of 16 examples: the global batch of one process of 32
ZERO3 = ["--use_cpu", "--per_device_train_batch_size", "16", "--deepspeed", str(ROOT / "deepspeed_config.json")]


@pytest.fixture(scope="module")
def single_process(workdir, start_checkpoint):
    out = workdir / "output/sharded-single"
    run_script(
        "trainer/getting_started.py",
        *from_start(start_checkpoint, out, "--max_steps", "160", "--per_device_train_batch_size", "32"),
        cwd=workdir,
    )
    return read_metrics(out)


def deepspeed_cpu(script: str, *args: str, cwd: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(SCRIPTS / script),
        *args,
    ]
    run(cmd, cwd=cwd, OMP_NUM_THREADS="1")


def test_zero3_two_cpu_processes_learns_saves_and_matches_single_process(workdir, start_checkpoint, single_process):
    """ZeRO-3 under `accelerate launch`, as the README shows, for as long as the single process learns."""
    out = workdir / "output/zero-accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port", str(free_port()), str(SCRIPTS / "trainer/sharded/zero.py")]
    # without ACCELERATE_USE_CPU, which would make accelerate pick CPU DDP over DeepSpeed
    run([*cmd, *from_start(start_checkpoint, out, "--max_steps", "160", *ZERO3)], cwd=workdir, OMP_NUM_THREADS="1")
    metrics = read_metrics(out)
    assert metrics["num_devices"] == 2 and metrics["distributed_type"] == "DEEPSPEED"  # the ZeRO-3 engine really ran
    assert metrics["eval_accuracy"] >= 0.80  # chance 0.20
    # Same start, same global batches (2 x 16 = 32) as the single process: losses agree to float
    # round-off of the partitioned reductions (observed ~1e-6 relative; 1e-3 leaves room for other BLAS).
    assert train_losses(metrics) == pytest.approx(train_losses(single_process), rel=1e-3)
    # The model gathered at save time is complete: it reloads in a fresh process with the same eval.
    result = json.loads(run_script("evaluate_model.py", "--model_dir", str(out), cwd=workdir).stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] == metrics["eval_accuracy"]
    # The Trainer's eval loss is a mean of per-batch means; 2 processes batch the test set
    # differently from 1, so the loss differs in the 4th digit while the weights are the same.
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=2e-3)


def test_zero3_under_the_deepspeed_launcher_matches_single_process(workdir, start_checkpoint):
    """The other launcher of the README, `deepspeed`: a short run (constant learning rate, so that its first steps are
    those of any run length) against one process on the same global batches; the saved model reloads."""
    short = ["--max_steps", "20", "--logging_steps", "5", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
    one = workdir / "output/zero-deepspeed-single"
    run_script(
        "trainer/getting_started.py",
        *from_start(start_checkpoint, one, *short, "--per_device_train_batch_size", "32"),
        cwd=workdir,
    )
    out = workdir / "output/zero-deepspeed"
    deepspeed_cpu("trainer/sharded/zero.py", *from_start(start_checkpoint, out, *short, *ZERO3), cwd=workdir)
    metrics = read_metrics(out)
    assert metrics["num_devices"] == 2 and metrics["distributed_type"] == "DEEPSPEED"
    assert list(train_losses(metrics)) == [5, 10, 15, 20]
    assert train_losses(metrics) == pytest.approx(train_losses(read_metrics(one)), rel=1e-3)
    result = json.loads(run_script("evaluate_model.py", "--model_dir", str(out), cwd=workdir).stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] == metrics["eval_accuracy"]


def test_fsdp_script_runs_single_process_and_saves_a_loadable_model(workdir):
    out = workdir / "output/fsdp-cpu"
    run_script("trainer/sharded/fsdp.py", "--max_steps", "200", *SHORT, "--output_dir", str(out), cwd=workdir)
    metrics = read_metrics(out)
    assert metrics["fsdp"] is False and metrics["eval_accuracy"] >= 0.80
    result = json.loads(run_script("evaluate_model.py", "--model_dir", str(out), cwd=workdir).stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] == metrics["eval_accuracy"]


def test_fsdp_lora_script_saves_an_adapter_that_reloads(workdir):
    out = workdir / "output/fsdp-lora-cpu"
    run_script("trainer/sharded/fsdp_lora.py", "--max_steps", "250", *SHORT, "--output_dir", str(out), cwd=workdir)
    metrics = read_metrics(out)
    assert metrics["eval_accuracy"] >= 0.80
    assert (out / "adapter_model.safetensors").exists() and (out / "base/model.safetensors").exists()
    result = json.loads(run_script("evaluate_model.py", "--model_dir", str(out), cwd=workdir).stdout.strip().splitlines()[-1])
    assert result["adapter"] and result["eval_accuracy"] == metrics["eval_accuracy"]


def test_fsdp_qlora_refuses_without_cuda(workdir):
    proc = run_script("trainer/sharded/fsdp_qlora.py", cwd=workdir, check=False)
    assert proc.returncode == 1 and "error: fsdp_qlora.py needs CUDA GPUs" in proc.stderr
    assert not (workdir / "output/trainer/sharded/fsdp_qlora").exists()


@pytest.mark.parametrize(
    "name",
    [
        "accelerate_config.yaml",
        "accelerate_config_fsdp.yaml",
        "accelerate_config_fsdp_lora.yaml",
        "accelerate_config_fsdp_qlora.yaml",
    ],
)
def test_accelerate_configs_parse_and_fit_the_model(workdir, name):
    from accelerate.commands.config.config_args import ClusterConfig

    from hftrain.data import load_prepared
    from hftrain.models import load_model

    config = ClusterConfig.from_yaml_file(str(ROOT / name))  # accelerate's own parser: unknown keys fail
    raw = yaml.safe_load((ROOT / name).read_text())
    assert config.num_machines == 1 and config.num_processes >= 2
    if "fsdp" not in name:
        assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16"
        return
    fsdp = raw["fsdp_config"]
    assert config.distributed_type == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    model = load_model("tiny", load_prepared(str(workdir / "data/synthetic")).tokenizer)
    wrapped = fsdp.get("fsdp_transformer_layer_cls_to_wrap", ",".join(model._no_split_modules)).split(",")
    assert {type(m).__name__ for m in model.modules()} >= set(wrapped)
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # the scripts gather a full one for the final save
    if "qlora" in name:
        assert config.mixed_precision == "no"  # the model is loaded in bf16; FSDP must not cast the 4-bit storage
    else:
        assert config.mixed_precision == "bf16"
    # With PEFT, FSDP's checkpoint wrapper makes the adapter save empty (see the test below): the
    # LoRA scripts checkpoint through TrainingArguments instead.
    assert fsdp["fsdp_activation_checkpointing"] is ("lora" not in name)
    if name == "accelerate_config_fsdp_lora.yaml":  # see the test below
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


def test_ram_efficient_loading_cannot_retie_a_peft_model_with_tied_embeddings(workdir, tmp_path):
    """Why accelerate_config_fsdp_lora.yaml turns fsdp_cpu_ram_efficient_loading off: with it, accelerate's FSDP2
    preparation moves the model to the meta device and calls tie_weights(), which fails on a tied model (the 1b
    preset) whose embeddings are in modules_to_save. Seen on 2 GPUs with the 1b preset; the same call here on CPU.
    If this test starts failing, the libraries have fixed it and the option can go back on."""
    from peft import LoraConfig, get_peft_model

    from hftrain.data import load_prepared
    from hftrain.models import load_model

    tokenizer = load_prepared(str(workdir / "data/synthetic")).tokenizer
    model = load_model("tiny", tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    lora = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora).to(torch.device("meta"))
    with pytest.raises(KeyError, match="attribute 'weight' already exists"):
        peft_model.tie_weights()


def test_deepspeed_config_is_zero3_with_complete_saves():
    from hftrain.sharding import check_deepspeed_config

    config = check_deepspeed_config(str(ROOT / "deepspeed_config.json"))
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"


def test_fsdp_config_naming_a_missing_layer_class_is_refused(workdir, tmp_path):
    config = yaml.safe_load((ROOT / "accelerate_config_fsdp.yaml").read_text())
    config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = "GPT2Block"
    config.update(use_cpu=True, num_processes=1, mixed_precision="no")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tmp_path / "bad.yaml"),
        str(SCRIPTS / "trainer/sharded/fsdp.py"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    proc = run(cmd, cwd=workdir, check=False)
    assert proc.returncode != 0
    assert (
        "error: the FSDP config wraps GPT2Block, which this model does not have; set fsdp_transformer_layer_cls_to_wrap to LlamaDecoderLayer"
        in proc.stderr
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"zero_optimization": {"stage": 3,}}', "is not valid JSON (line 1"),
        ('{"zero_optimization": {"stage": 3}}', "uses ZeRO-3 without stage3_gather_16bit_weights_on_model_save"),
    ],
)
def test_bad_deepspeed_config_is_refused(workdir, tmp_path, content, message):
    (tmp_path / "ds.json").write_text(content)
    proc = run_script(
        "trainer/sharded/zero.py",
        "--deepspeed",
        str(tmp_path / "ds.json"),
        "--output_dir",
        str(tmp_path / "o"),
        cwd=workdir,
        check=False,
    )
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_fsdp2_lora_adapter_state_dict_is_complete_on_two_cpu_processes(tmp_path):
    """FSDP2 shards a LoRA model over 2 gloo processes; the full state dict that the Trainer saves
    from must give PEFT every LoRA tensor. With the model's own gradient checkpointing (the
    project's recipe) it does; with FSDP's checkpoint wrapper (fsdp_activation_checkpointing)
    PEFT keeps only the modules_to_save copies: the pitfall accelerate_config_fsdp_lora.yaml avoids."""
    out = tmp_path / "keys.json"
    port = str(free_port())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        str(ROOT / "tests" / "fsdp2_lora_state_dict.py"),
        str(out),
    ]
    run(cmd, cwd=tmp_path, OMP_NUM_THREADS="1")
    result = json.loads(out.read_text())
    lora = [k for k in result["model_gradient_checkpointing"] if "lora_" in k]
    assert len(lora) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert result["model_gradient_checkpointing"] == result["unsharded"]
    assert not [k for k in result["fsdp_checkpoint_wrapper"] if "lora_" in k]  # the pitfall, still present


@pytest.mark.parametrize("liger, zero3", [(True, True), (True, False), (False, True)])
def test_liger_under_zero3_gathers_the_lm_head_weight_with_the_model(workdir, monkeypatch, liger, zero3):
    """Liger's fused loss reads lm_head.weight outside lm_head's forward: under ZeRO-3 only, the weight
    must be registered with the model, or the loss sees an empty partition (seen on 2 and 4 GPUs)."""
    from types import SimpleNamespace

    import transformers.integrations

    from hftrain.data import load_prepared
    from hftrain.models import load_model
    from hftrain.sharding import gather_lm_head_for_liger

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: zero3)
    model = load_model("tiny", load_prepared(str(workdir / "data/synthetic")).tokenizer)
    gather_lm_head_for_liger(model, SimpleNamespace(use_liger_kernel=liger))
    external = list(getattr(model, "_external_params", {}).values())
    weight = model.get_output_embeddings().weight
    assert any(p is weight for p in external) == (liger and zero3)


QLORA_WORDS = ("4bit", "4-bit", "quant", "bnb", "bitsandbytes", "bf16", "bfloat16", "cuda", "qlora")


def test_fsdp_qlora_differs_from_fsdp_lora_only_by_the_4bit_base():
    """fsdp_qlora.py is fsdp_lora.py with a 4-bit base: the LoRA config, the FSDP save and the rest stay the same."""
    assert_twins("trainer/sharded/fsdp_lora.py", "trainer/sharded/fsdp_qlora.py", QLORA_WORDS, min_statements=20)
