"""scripts/plan.py: the planner's answers, its refusals, and its predictions against every committed results row."""

import json
import runpy
import sys

import pytest

from conftest import ROOT, SCRIPTS

LLAMA_3_1_8B = {  # meta-llama/Llama-3.1-8B's config.json (the shape only: no weights are read)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def plan(monkeypatch, capsys, *args: str) -> str:
    """plan.py as a user runs it, in this process (it reads configs only: no weights, no network)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "plan.py"), *args])
    runpy.run_path(str(SCRIPTS / "plan.py"), run_name="__main__")
    return capsys.readouterr().out


def test_check_every_committed_results_row_within_targets(monkeypatch, capsys):
    files = sorted(str(p) for p in ROOT.glob("results/*/*.json"))
    report = json.loads(plan(monkeypatch, capsys, "--check", *files, "--json"))
    assert len(report["rows"]) >= 96, len(report["rows"])
    worst = max(report["rows"], key=lambda r: abs(r["memory_error"]))
    assert report["worst_memory_error"] <= 0.10, worst
    worst = max(report["rows"], key=lambda r: abs(r["tokens_per_s_error"]))
    assert report["worst_tokens_per_s_error"] <= 0.20, worst
    text = plan(monkeypatch, capsys, "--check", *files)
    assert text.strip().splitlines()[-1].startswith("worst error: memory ")
    assert text.strip().endswith(f"over {len(report['rows'])} rows")


def test_24_gb_full_fine_tune_of_llama_3_2_1b_at_4k_fits(monkeypatch, capsys):
    args = ["--model", "llama-3.2-1b", "--gpus", "1", "--gpu", "4090", "--seq_len", "4096", "--method", "full"]
    answer = json.loads(plan(monkeypatch, capsys, *args, "--json"))
    fitting = [o for o in answer["options"] if o["fits"]]
    assert fitting and all(o["peak_memory_gib"] < 23.6 for o in fitting), answer["options"]
    best = fitting[0]
    assert {"script", "config", "flags", "fits", "peak_memory_gib", "tokens_per_s_per_gpu"} <= set(best)
    assert best["tokens_per_s_per_gpu"] > 0 and "--fused_loss" in best["flags"]
    assert answer["launch"].startswith("CUDA_VISIBLE_DEVICES=0 python scripts/sdpa/flash_attention.py --model llama-3.2-1b")
    assert "--pack_rows 4096" in answer["launch"]
    text = plan(monkeypatch, capsys, *args)
    assert "launch: CUDA_VISIBLE_DEVICES=0 python scripts/sdpa/flash_attention.py" in text


def test_two_machines_of_8_gpus_shard_an_8b_model(monkeypatch, capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    args = ["--model", str(tmp_path), "--gpus", "8", "--nodes", "2", "--gpu", "h100", "--seq_len", "8192", "--json"]
    answer = json.loads(plan(monkeypatch, capsys, *args))
    assert 7.9e9 < answer["parameters"] < 8.1e9
    by_script = {o["script"]: o for o in answer["options"]}
    # DDP keeps 16 bytes per parameter on every GPU: 120 GiB for 8B, more than an H100 has
    assert not by_script["scripts/trainer/getting_started.py"]["fits"]
    assert by_script["scripts/trainer/getting_started.py"]["breaks"] == "optimizer"
    best = answer["options"][0]
    assert best["fits"] and best["script"] in ("scripts/trainer/sharded/fsdp.py", "scripts/trainer/sharded/zero.py")
    assert "--num_machines 2" in answer["launch"] and "--num_processes 16" in answer["launch"]


@pytest.mark.parametrize(
    "case, args, says",
    [
        ("unknown GPU", ["--model", "llama-3.2-1b", "--gpu", "mi300x"], "unknown --gpu mi300x"),
        ("zero GPUs", ["--model", "llama-3.2-1b", "--gpus", "0"], "--gpus and --nodes must be at least 1"),
        ("too long", ["--model", "llama-3.2-1b", "--seq_len", "200000"], "longer than the 131072 positions"),
        ("no config.json", ["--model", "{tmp}"], "is not a model checkpoint directory"),
    ],
)
def test_refusals_in_one_sentence(monkeypatch, capsys, tmp_path, case, args, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as e:
        plan(monkeypatch, capsys, *args)
    message = str(e.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message, message


def test_unknown_gpu_with_its_memory_plans_memory_only(monkeypatch, capsys):
    args = ["--model", "qwen2.5-0.5b", "--gpu", "mi300x", "--gpu_memory_gib", "192", "--method", "lora", "--json"]
    answer = json.loads(plan(monkeypatch, capsys, *args))
    assert answer["options"][0]["fits"] and answer["options"][0]["tokens_per_s_per_gpu"] is None


def test_mfu_peaks_come_from_the_gpu_table():
    from hftrain.reporting import peak_flops

    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops("cpu") is None
