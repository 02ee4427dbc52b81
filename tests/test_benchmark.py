"""The benchmark harness on CPU: its smoke run, the examples its rows launch, skipped cases, and the packing its
padding-free cases use."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run_script


@pytest.fixture(scope="module")
def smoke(workdir):
    # a row that launches flash_attention.py, two that say why not (a peer, built in the harness's process: below)
    cases = "SDPA padding-free,FA2 padding-free,DDP x2"
    proc = run_script("benchmarks/throughput.py", "--smoke", "--cases", cases, "--output", "results/smoke/benchmark", cwd=workdir)
    return json.loads((workdir / "results/smoke/benchmark.json").read_text()), proc


def test_smoke_run_measures_every_case_it_can_and_says_why_not_for_the_rest(smoke, workdir):
    result, proc = smoke
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == ["SDPA padding-free (block-diagonal mask)", "FA2 padding-free", "DDP x2: blocks + Liger (big batch)"]
    packed = rows["SDPA padding-free (block-diagonal mask)"]
    assert packed["tokens_per_s_per_gpu"] > 0 and packed["step_time_s"] > 0 and packed["loss"] > 0, packed
    assert packed["flops_per_token"] > 0 and packed["gpus"] == 1
    assert [step for step, _ in packed["loss_curve"]] == [1, 2, 3, 4], packed  # 1 warm-up step, 3 measured
    # Packed rows of whole documents: fewer real tokens per step than micro-batch x T (blocks: exactly that, below).
    assert 0 < packed["tokens_per_step"] < 2 * result["seq_len"]
    # That row is the example itself, run by the harness with the flags the row names.
    assert packed["command"] == (
        "python scripts/sdpa/flash_attention.py --attn_implementation sdpa --pack_rows 256 --per_device_train_batch_size 2"
    )
    assert (
        f"| {packed['case']} | 2 | {packed['tokens_per_s_per_gpu']:,.0f} |"
        in (workdir / "results/smoke/benchmark.md").read_text()
    )
    assert rows["FA2 padding-free"]["skipped"] == "needs flash-attn and a CUDA GPU"
    assert rows["DDP x2: blocks + Liger (big batch)"]["skipped"].startswith("needs 2 GPUs")
    assert result["versions"]["torch"] == torch.__version__ and result["device"] == "cpu"
    md = (workdir / "results/smoke/benchmark.md").read_text()
    assert "| FA2 padding-free | | skipped: needs flash-attn" in md
    assert (workdir / "results/smoke/benchmark.png").stat().st_size > 0


def test_unknown_case_is_refused(workdir):
    proc = run_script("benchmarks/throughput.py", "--smoke", "--cases", "P9", cwd=workdir, check=False)
    assert proc.returncode == 1 and "error: unknown case(s) ['P9']" in proc.stderr


def test_packing_keeps_documents_whole_and_rows_within_capacity():
    from hftrain.packing import PackedRowsCollator, pack_documents

    lengths = [300, 2048, 1000, 700, 50, 1500, 256, 900]
    rows = pack_documents(lengths, 2048)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    assert len(rows) == 4  # 6754 tokens need at least 4 rows of 2048

    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    batch = PackedRowsCollator("sdpa")([{"documents": docs[:2]}, {"documents": docs[2:]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8, 9]]  # no target across a boundary

    # A fixed length for torch.compile: one extra padding document, no targets, its own segment.
    fixed = PackedRowsCollator("flash_attention_2", pad_to=12, pad_token_id=0)([{"documents": docs}])
    assert fixed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]]
    assert fixed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert fixed["labels"][0, -3:].tolist() == [-100] * 3
    assert fixed["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12] and fixed["max_length_q"] == 4


def test_sharded_smoke_launches_the_example_itself_under_ddp_on_two_cpu_processes(workdir):
    """The sharded harness's row is the example's own run: getting_started.py under accelerate_config.yaml, its
    metrics.json read back (on CPU: gloo, 2 processes, tiny preset, 3 steps)."""
    run_script("benchmarks/sharded.py", "--smoke", "--output", "results/smoke/sharded", cwd=workdir)
    result = json.loads((workdir / "results/smoke/sharded.json").read_text())
    (row,) = result["rows"]
    assert (row["case"], row["script"], row["config"]) == ("DDP", "trainer/getting_started.py", "accelerate_config.yaml")
    assert row["num_devices"] == 2 and row["steps"] == 3 and row["train_tokens_per_second_per_device"] > 0, row
    assert result["device"] == "cpu" and result["model"] == "tiny" and result["versions"]["torch"] == torch.__version__
    assert "| DDP |" in (workdir / "results/smoke/sharded.md").read_text()


def test_every_harness_records_the_machine_the_same_way(workdir):
    """One record of device, date and versions, and the GaLore modules galore.py trains, shared by the harnesses."""
    from conftest import SCRIPTS
    from hftrain.benchmarking import GALORE_TARGET_MODULES, machine

    head = machine("torch")
    assert head["device"] == "cpu" and head["gpu_count"] == 0 and head["versions"]["cuda"]
    assert len(head["date"]) == 10 and head["versions"]["torch"] == torch.__version__
    assert f'r"{GALORE_TARGET_MODULES}"' in (SCRIPTS / "trainer/galore.py").read_text()
    for harness in ("throughput", "memory", "sharded", "attention"):
        source = (SCRIPTS / "benchmarks" / f"{harness}.py").read_text()
        assert "from hftrain.benchmarking import" in source and "machine(" in source, harness
        assert "datetime" not in source and "get_device_name()" not in source, harness


def test_a_failed_launch_is_reported_by_the_workers_own_exception():
    from hftrain.launch import worker_error

    stderr = (
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]: KeyError: \"attribute 'weight' already exists\"\n"
        "==================================================\n"
        "    raise ChildFailedError(\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    assert worker_error(stderr, 1) == "[rank1]: KeyError: \"attribute 'weight' already exists\""
    assert worker_error("W1128 a warning\nsomething went wrong\n", 1) == "W1128 a warning / something went wrong"
    assert worker_error("", -9) == "exit status -9"


def test_a_checkpoint_directory_is_benchmarked_and_its_config_recorded(workdir, start_checkpoint):
    """--model <checkpoint>: the FLOPs count reads the checkpoint's config (it used to look the name up in the
    presets and fail); the results record the model's config; --profile_steps adds where the time went (a peer)."""
    out = "results/smoke/tiny-0.1m"  # a dotted name keeps its dots: tiny-0.1m.json, not tiny-0.json
    run_script(
        "benchmarks/throughput.py",
        "--smoke",
        "--model",
        start_checkpoint,
        "--cases",
        "P2",
        "--profile_steps",
        "1",
        "--output",
        out,
        cwd=workdir,
    )
    result = json.loads((workdir / f"{out}.json").read_text())
    (row,) = result["rows"]
    assert result["model"] == start_checkpoint and row["tokens_per_s_per_gpu"] > 0 and row["flops_per_token"] > 0
    # A peer, built in the harness's process; blocks are full rows: every step carries micro-batch x T real tokens.
    assert row["tokens_per_step"] == 2 * result["seq_len"] and row["step_time_s"] > 0 and row["loss"] > 0
    assert [step for step, _ in row["loss_curve"]] == [1, 2, 3, 4] and row["gpus"] == 1  # 1 warm-up step, 3 measured
    assert result["vocab_size"] == result["model_config"]["vocab_size"] == 640
    assert result["model_config"]["model_type"] == "llama" and result["model_config"]["num_hidden_layers"] == 2
    assert row["profile"]["steps"] == 1 and row["profile"]["step_ms"] > 0 and row["graph_breaks"] == 0
    assert "Where a step's time goes" in (workdir / f"{out}.md").read_text()


def test_real_model_presets_keep_their_vocabulary():
    """llama-3.2-1b and qwen2.5-0.5b are the real configs: their vocabularies are not cut to the data's tokenizer."""
    from hftrain.models import preset_config

    tok = type("Tok", (), {"__len__": lambda self: 640, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})()
    llama = preset_config("llama-3.2-1b", tok)
    assert (llama.model_type, llama.vocab_size, llama.hidden_size, llama.num_hidden_layers) == ("llama", 128256, 2048, 16)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.intermediate_size) == (32, 8, 8192)
    assert llama.tie_word_embeddings and llama.max_position_embeddings == 131072
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0
    qwen = preset_config("qwen2.5-0.5b", tok)
    assert (qwen.model_type, qwen.vocab_size, qwen.hidden_size, qwen.num_hidden_layers) == ("qwen2", 151936, 896, 24)
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.intermediate_size) == (14, 2, 4864)
    assert qwen.tie_word_embeddings and qwen.rope_parameters["rope_theta"] == 1e6
    assert preset_config("1b", tok).vocab_size == 640  # the toy presets still take the tokenizer's


def load_script(path: str, name: str):
    import importlib.util

    from conftest import SCRIPTS

    spec = importlib.util.spec_from_file_location(name, SCRIPTS / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_flash_attention(script, argv, output_dir):
    """flash_attention.py's own parsing of `argv`, and the `Recipe` its flags build (setting the Trainer's fields)."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((script.AttentionArguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=[*argv, "--output_dir", str(output_dir)])
    return args, training_args, script.recipe(args, training_args)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "float8"])
def test_the_script_and_the_benchmark_build_the_same_recipe(tmp_path, fp8):
    """The benchmark's recipe case launches flash_attention.py with exactly the flags of the command in the script's
    docstring, and the script turns both into the same `hftrain.recipe.Recipe` and Trainer settings."""
    import re
    from dataclasses import replace

    bench = load_script("benchmarks/throughput.py", "throughput_script")
    script = load_script("sdpa/flash_attention.py", "flash_attention_script")
    line = next(ln for ln in script.__doc__.splitlines() if ("float8 (H100" in ln) == fp8 and "--compile_layers" in ln)
    flags = re.findall(r"--\w+(?: (?!--)\S+)?", line)
    argv = [part for flag in flags for part in flag.split(" ")]

    case = {c.name: c for c in bench.CASES}[bench.RECIPE_FP8 if fp8 else bench.RECIPE_BF16]
    assert case.big_batch  # 16 rows on a GPU of 100 GiB or more, as the docstring's command
    case = replace(case, micro_batch=16)
    bench_args = bench.Args(model="llama-3.2-1b", data_dir="data/synthetic-long", seq_len=2048)
    cmd = bench.launch(case, bench_args, tmp_path / "case")
    assert cmd[1].endswith("scripts/sdpa/flash_attention.py")
    named = bench.example_flags(case, bench_args.seq_len) + ["--per_device_train_batch_size", "16"]
    own = [f for f in flags if not f.startswith(("--model ", "--data_dir "))]  # those two: every row's
    assert sorted(own) == sorted(re.findall(r"--\w+(?: (?!--)\S+)?", " ".join(named)))
    for flag in flags:  # each of the docstring's flags, with its value, is in the launched command
        name, *value = flag.split(" ")
        at = len(cmd) - 1 - cmd[::-1].index(name)  # the last occurrence: the one the parser keeps
        assert cmd[at : at + 1 + len(value)] == [name, *value], flag

    _, doc_training, from_doc = parse_flash_attention(script, argv, tmp_path / "doc")
    _, bench_training, from_bench = parse_flash_attention(script, cmd[2:], tmp_path / "bench")
    assert from_doc == from_bench and from_bench.fp8 == fp8 and from_bench.fused_loss and from_bench.compile_layers
    assert from_bench.rows == 16 and from_bench.pack_rows == 2048
    for key in ("per_device_train_batch_size", "use_liger_kernel", "liger_kernel_config", "remove_unused_columns", "optim"):
        assert getattr(doc_training, key) == getattr(bench_training, key), key
    assert bench_training.liger_kernel_config == {
        "fused_linear_cross_entropy": True,
        "cross_entropy": False,
        "rms_norm": False,
        "swiglu": False,
        "rope": False,
    }
    collator = from_bench.collator(0)
    assert collator.pad_to == 16 * 2048 and collator.flatten.return_flash_attn_kwargs


def test_every_row_of_ours_is_what_its_example_builds_from_the_rows_flags(tmp_path):
    """Each flash_attention.py row, launched as the harness launches it and parsed by the script itself, gets the
    attention, batches, Liger kernels, compilation, float8 and optimizer the row names (flex attention and Liger's
    full kernels next to packed rows were not flags the script took)."""
    bench = load_script("benchmarks/throughput.py", "throughput_rows")
    script = load_script("sdpa/flash_attention.py", "flash_attention_rows")
    ours = [c for c in bench.CASES if c.script == bench.FLASH_ATTENTION]
    assert len(ours) == 16 and not [c for c in bench.CASES if not c.script and not c.peer and c.gpus == 1 and not c.launch]
    for i, case in enumerate(ours):
        cmd = bench.launch(case, bench.Args(model="1b"), tmp_path / str(i))
        args, training_args, recipe = parse_flash_attention(script, cmd[2:], tmp_path / f"parsed{i}")
        assert args.attn_implementation == case.attn and args.padding_free == (case.batches == "packed"), case.name
        assert args.pack_rows == (2048 if case.batches == "packed" else 0), case.name
        assert (recipe.compile_layers, recipe.fp8, recipe.fused_loss) == (case.compile == "layers", case.fp8, case.fused_loss)
        assert training_args.per_device_train_batch_size == case.micro_batch and training_args.optim.value == case.optim
        assert training_args.use_liger_kernel == (case.liger or case.fused_loss), case.name
        assert training_args.liger_kernel_config == (bench.FUSED_LOSS_ONLY if case.fused_loss and not case.liger else None)
        if "galore" in case.optim:
            assert training_args.optim_args == bench.GALORE_ARGS
            assert training_args.optim_target_modules == bench.GALORE_TARGET_MODULES
        assert (training_args.max_steps, training_args.logging_steps, training_args.lr_scheduler_type.value) == (
            25,
            5,
            "constant",
        )


def test_profile_breakdown_buckets_kernels_by_what_launched_them():
    """A hand-made Chrome trace: each kernel is traced to its launching ops through the correlation id."""
    from hftrain.profiling import breakdown

    ev = []

    def op(name, ts, dur, dims=None, tid=1, cat="cpu_op"):
        ev.append({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {"Input Dims": dims or []}})

    def kernel(name, ts, dur, corr, launch_ts, tid=1):
        ev.append(
            {
                "ph": "X",
                "cat": "cuda_runtime",
                "name": "cudaLaunchKernel",
                "ts": launch_ts,
                "dur": 1,
                "tid": tid,
                "args": {"correlation": corr},
            }
        )
        ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}})

    op("aten::linear", 0, 10, [[8, 64], [128256, 64]])  # the output layer: a vocabulary-sized dimension
    op("aten::mm", 1, 8, [[8, 64], [64, 128256]])
    kernel("sm90_xmma_gemm_bf16bf16", 100, 40, 1, 2)
    op("aten::mm", 20, 5, [[8, 64], [64, 256]])  # a decoder matmul
    kernel("nvjet_tst_128x256", 140, 20, 2, 21)
    op("flash_attn::_flash_attn_varlen_forward", 30, 5)
    kernel("flash_fwd_kernel", 160, 30, 3, 31)
    op("Optimizer.step#AdamW.step", 40, 10, cat="user_annotation")
    op("aten::_fused_adam_", 41, 5)
    kernel("multi_tensor_apply_kernel", 190, 10, 4, 42)
    op("aten::add", 60, 2, tid=2)  # backward thread
    kernel("vectorized_elementwise_kernel", 250, 10, 5, 61, tid=2)
    op("aten::_local_scalar_dense", 70, 1)
    ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 70, "dur": 50, "tid": 1, "args": {}})
    p = breakdown({"traceEvents": ev}, steps=1, wall_s=300e-6, vocab_size=128256)
    ms = p["gpu_ms"]
    assert ms["output layer + loss"] == 0.04 and ms["matmuls (decoder)"] == 0.02 and ms["attention"] == 0.03
    assert ms["optimizer + grad clipping"] == 0.01 and ms["norms, activations, residuals, other"] == 0.01
    assert p["gpu_busy_ms"] == 0.11 and p["gpu_idle_ms"] == 0.19 and p["host_syncs"] == 2 and p["sync_wait_ms"] == 0.05


def test_big_batch_reaches_the_process_that_runs_the_case():
    """--big_batch sizes the 'big batch' rows inside each case's own process (seen on an H200: it was not passed on, so
    a 24-row request ran 16 rows)."""
    throughput = load_script("benchmarks/throughput.py", "throughput")
    case = next(c for c in throughput.CASES if c.big_batch and not c.launch)
    cmd = throughput.launch(case, throughput.Args(big_batch=24), Path("case"))
    assert cmd[cmd.index("--big_batch") + 1] == "24"


def test_a_launched_rows_numbers_are_the_logged_steps_after_the_warm_up():
    """An example's metrics.json read as a row: tokens and seconds between the warm-up's last logged row and the last
    measured one; peak memory (CUDA: the callback's peak since the row before) over the measured rows only."""
    from hftrain.benchmarking import after_warmup

    def row(step, runtime, tokens, peak):
        return {"loss": 3.0 - step / 10, "step": step, "train_runtime": runtime, "num_input_tokens_seen": tokens, **peak}

    history = [
        row(2, 9.0, 2000, {"peak_memory_gib": 70.0, "peak_reserved_gib": 75.0}),  # warm-up: compilation's peak
        row(4, 10.0, 4000, {"peak_memory_gib": 50.0, "peak_reserved_gib": 52.0}),
        {"eval_loss": 1.0, "step": 4},
        row(6, 11.0, 6000, {"peak_memory_gib": 51.0, "peak_reserved_gib": 53.0}),
        row(8, 13.0, 8000, {"peak_memory_gib": 90.0, "peak_reserved_gib": 95.0}),  # after the measured steps
    ]
    r = after_warmup({"log_history": history}, warmup=2, steps=4)
    assert r["tokens_per_s"] == 4000 / 2.0 and r["step_time_s"] == 0.5 and r["tokens_per_step"] == 1000
    assert (r["peak_allocated_gib"], r["peak_reserved_gib"]) == (51.0, 53.0) and r["loss"] == 3.0 - 0.6
    assert [step for step, _ in r["loss_curve"]] == [2, 4, 6]


def test_the_callback_logs_each_rows_peak_memory_since_the_row_before(monkeypatch):
    """On CUDA each logged loss row gets the peak memory since the row before (the benchmarks read the measured steps'
    peak from metrics.json), and the run's own peak still counts the whole run. CUDA's counters faked here."""
    import hftrain.reporting as reporting

    peaks = {"allocated": 0.0, "reserved": 0.0}
    monkeypatch.setattr(reporting.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(reporting, "peak_memory_gib", lambda: peaks["allocated"])
    monkeypatch.setattr(reporting, "peak_reserved_gib", lambda: peaks["reserved"])
    monkeypatch.setattr(reporting, "reset_peak_memory", lambda: peaks.update(allocated=1.0, reserved=2.0))
    monkeypatch.setattr(reporting, "synchronize", lambda: None)
    monkeypatch.setattr(reporting, "device_name", lambda: "fake GPU")

    state = type("State", (), {"log_history": [], "global_step": 0, "num_input_tokens_seen": 0})()
    callback = reporting.ThroughputCallback(seq_len=8)
    callback._start(state)
    for step, (allocated, reserved) in enumerate([(70.0, 75.0), (50.0, 52.0)], start=1):
        peaks.update(allocated=allocated, reserved=reserved)
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        state.log_history.append({"loss": 1.0, "step": step})
        callback.on_log(None, state, None, logs={"loss": 1.0})
    state.log_history.append({"eval_loss": 1.0, "step": 2})
    callback.on_log(None, state, None, logs={"eval_loss": 1.0})  # not a training row: left alone
    assert [(r.get("peak_memory_gib"), r.get("peak_reserved_gib")) for r in state.log_history] == [
        (70.0, 75.0),
        (50.0, 52.0),
        (None, None),
    ]
    callback._stop(state)
    assert (callback.metrics["peak_memory_gib"], callback.metrics["peak_reserved_gib"]) == (70.0, 75.0)
