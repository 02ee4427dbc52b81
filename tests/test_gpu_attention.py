"""GPU checks of the attention examples (pytest -m gpu tests/test_gpu_attention.py); skipped without CUDA.

FA2 tests also need the flash-attn package (pip install flash-attn --no-build-isolation) and skip without it.
"""

import json

import pytest
import torch

from conftest import read_metrics, run_script, train_losses

pytestmark = pytest.mark.gpu
ONE_GPU = {"CUDA_VISIBLE_DEVICES": "0"}


def needs_flash_attn() -> None:
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed (pip install flash-attn --no-build-isolation)")


@pytest.fixture(scope="module")
def data(workdir):
    from hftrain.data import load_prepared

    return load_prepared(str(workdir / "data/synthetic"))


def on_gpu(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("impl", ["flash_attention_2", "sdpa"])
@torch.no_grad()
def test_padding_free_equals_padded_in_bf16(data, impl):
    """The padded and packed losses agree and each packed document's logits are its logits alone, in bf16.

    Tolerances: bf16 keeps 8 significant bits, so a logit of magnitude <= 2 is rounded to within 2^-7 ~ 0.008,
    and packed, padded and single-document runs use different kernels and GEMM shapes (different summation
    orders). 0.05 allows a few such roundings after two layers; the control below, the same packed row with
    attention across documents, is off by more than 0.2. The loss averages ~600 targets, so its rounding mostly
    cancels (~1e-4 relative); 1e-3 still catches a leak (about 2e-3 relative for these 16 documents).
    """
    if impl == "flash_attention_2":
        needs_flash_attn()
    from hftrain.data import PadCollator
    from hftrain.models import load_model
    from hftrain.packing import PaddingFreeCollator, split_documents

    torch.manual_seed(0)
    model = load_model("tiny", data.tokenizer, dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
    examples = [data.train[i] for i in range(16)]
    padded = PadCollator(data.tokenizer)(examples)
    padded.pop("prompt_len")
    padded, packed = on_gpu(padded), on_gpu(PaddingFreeCollator(impl)(examples))

    loss_padded = model(**padded, use_cache=False).loss.item()
    out = model(**packed)
    assert out.loss.item() == pytest.approx(loss_padded, rel=1e-3)

    alone = [model(input_ids=torch.tensor([ex["input_ids"]], device="cuda"), use_cache=False).logits[0] for ex in examples]
    docs = split_documents(out.logits, packed["position_ids"])
    err = max((d.float() - a.float()).abs().max().item() for d, a in zip(docs, alone))

    # Control: attention across documents. sdpa: the KV cache Llama's config asks for hides the boundaries
    # (the leak the first GPU probe saw); FA2: no position_ids, so one causal sequence over the whole row.
    leaky = {"input_ids": packed["input_ids"]}
    if impl == "sdpa":
        leaky.update(position_ids=packed["position_ids"], use_cache=True)
    leak_docs = split_documents(model(**leaky).logits, packed["position_ids"])
    leak = max((d.float() - a.float()).abs().max().item() for d, a in zip(leak_docs[1:], alone[1:]))
    print(f"{impl} bf16: loss padded {loss_padded:.5f} packed {out.loss.item():.5f}, logits err {err:.4f}, leak {leak:.3f}")
    assert err < 0.05 and leak > 0.2


def test_flash_attention_script_one_gpu(workdir):
    needs_flash_attn()
    out = workdir / "output/gpu_fa2"
    run_script(
        "sdpa/flash_attention.py",
        *("--model", "small", "--learning_rate", "5e-4", "--num_train_epochs", "2", "--output_dir", str(out)),
        cwd=workdir,
        **ONE_GPU,
    )
    m = read_metrics(out)
    print("FA2 padding-free, small:", {k: m[k] for k in ("eval_accuracy", "train_tokens_per_second", "mfu", "peak_memory_gib")})
    assert m["attn_implementation"] == "flash_attention_2" and m["padding_free"] and m["num_devices"] == 1
    assert m["eval_accuracy"] >= 0.90
    assert m["mfu"] is not None and 0 < m["mfu"] < 1


def test_flash_attention_padded_and_padding_free_train_alike(workdir):
    """The same 60 batches, packed or padded: the same losses up to bf16 autocast rounding."""
    needs_flash_attn()
    common = ["--max_steps", "60", "--eval_strategy", "no", "--save_strategy", "no"]
    run_script("sdpa/flash_attention.py", *common, "--output_dir", "output/gpu_fa2_packed", cwd=workdir, **ONE_GPU)
    run_script(
        "sdpa/flash_attention.py",
        *common,
        *("--padding_free", "false", "--output_dir", "output/gpu_fa2_padded"),
        cwd=workdir,
        **ONE_GPU,
    )
    packed, padded = read_metrics(workdir / "output/gpu_fa2_packed"), read_metrics(workdir / "output/gpu_fa2_padded")
    print("tokens/s packed", packed["train_tokens_per_second"], "padded", padded["train_tokens_per_second"])
    assert packed["train_tokens"] == padded["train_tokens"]
    # bf16 autocast: the two runs drift apart by rounding, a little more each step; 2% over 60 steps.
    assert train_losses(packed) == pytest.approx(train_losses(padded), rel=2e-2)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fastest_recipe_flags_learn_and_save(workdir, fp8):
    """The benchmark's recipe as flags: rows of whole documents, compiled layers, and float8 matmuls."""
    from hftrain.quantization import has_float8_tensor_cores

    needs_flash_attn()
    if fp8 and not has_float8_tensor_cores():
        pytest.skip("needs float8 tensor cores (compute capability 8.9+)")
    out = workdir / f"output/gpu_fa2_recipe_{'fp8' if fp8 else 'bf16'}"
    args = ["--model", "small", "--pack_rows", "1024", "--compile_layers", *(["--fp8"] if fp8 else [])]
    args += ["--per_device_train_batch_size", "2", "--learning_rate", "5e-4", "--num_train_epochs", "3"]
    run_script("sdpa/flash_attention.py", *args, "--output_dir", str(out), cwd=workdir, **ONE_GPU)
    m = read_metrics(out)
    print(
        f"recipe {'fp8' if fp8 else 'bf16'}, small:",
        {k: m[k] for k in ("eval_accuracy", "train_tokens_per_second", "peak_memory_gib")},
    )
    assert m["eval_accuracy"] >= 0.9
    # The saved model is a plain one (no float8 modules, no compiled wrappers): it reloads and scores the same.
    proc = run_script("evaluate_model.py", "--model_dir", str(out), cwd=workdir, **ONE_GPU)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["eval_accuracy"] == pytest.approx(m["eval_accuracy"], abs=0.03)


@pytest.mark.parametrize("backend", ["math", "flash", "efficient", "cudnn"])
def test_math_kernel_each_backend(workdir, backend):
    out = workdir / f"output/gpu_sdpa_{backend}"
    args = ["--backend", backend, "--max_steps", "150", "--eval_strategy", "no", "--save_strategy", "no"]
    run_script("sdpa/math_kernel.py", *args, "--output_dir", str(out), cwd=workdir, **ONE_GPU)
    m = read_metrics(out)
    print(f"sdpa {backend}:", {k: m[k] for k in ("eval_accuracy", "train_tokens_per_second", "peak_memory_gib")})
    assert m["sdpa_backend"] == backend and m["eval_accuracy"] >= 0.6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_padding_free_refuses_data_parallel(workdir):
    proc = run_script(
        "sdpa/flash_attention.py",
        "--attn_implementation",
        "sdpa",
        cwd=workdir,
        check=False,
        CUDA_VISIBLE_DEVICES="0,1",
    )
    assert proc.returncode == 1 and "DataParallel cannot split" in proc.stderr


def test_compare_smallest_case(tmp_path):
    """The benchmark's smallest case on the small preset: every available case runs and computes the same loss."""
    args = ["--seq_lens", "512", "--tokens_per_batch", "4096", "--warmup", "1", "--iters", "2", "--output_dir", str(tmp_path)]
    run_script("benchmarks/attention.py", *args, cwd=tmp_path, **ONE_GPU)
    report = json.loads((tmp_path / "compare.json").read_text())
    print((tmp_path / "compare.md").read_text())
    rows = report["results"]
    assert all(r["status"] in ("ok", "skipped") for r in rows), rows
    ok = [r for r in rows if r["status"] == "ok"]
    assert {"eager", "sdpa math", "sdpa padding-free"} <= {r["case"] for r in ok}
    assert all(r["peak_memory_gib"] > 0 for r in ok)
    losses = [r["loss"] for r in ok]
    assert max(losses) == pytest.approx(min(losses), rel=5e-3)  # bf16: the same function up to rounding
