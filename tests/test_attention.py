"""Attention implementations on CPU: padding-free batches equal padded ones, documents stay apart, the scripts run.

The model tests use the tiny preset in float32 with random weights, on real documents of the prepared data.
"""

import json

import pytest
import torch
from transformers.utils import is_flash_attn_2_available

from conftest import SCRIPTS, first_screen, read_metrics, run_in_process, run_script, train_losses

IMPLEMENTATIONS = ["eager", "sdpa"]
FAST = {"OMP_NUM_THREADS": "1"}  # tiny matmuls: one thread is as fast, and steadier on a busy machine


@pytest.fixture(scope="module")
def data(workdir):
    from hftrain.data import load_prepared

    return load_prepared(str(workdir / "data/synthetic"))


@pytest.fixture(scope="module")
def examples(data):
    docs = [data.train[i] for i in range(10)]
    assert len({len(d["input_ids"]) for d in docs}) > 3  # lengths vary, so padding really happens
    return docs


def tiny(data, impl: str):
    from hftrain.models import load_model

    torch.manual_seed(0)
    return load_model("tiny", data.tokenizer, attn_implementation=impl).eval()


def padded_batch(data, examples):
    from hftrain.data import PadCollator

    batch = PadCollator(data.tokenizer)(examples)
    batch.pop("prompt_len")
    return batch


def packed_batch(examples, impl: str):
    from hftrain.packing import PaddingFreeCollator

    return PaddingFreeCollator(impl)(examples)


def alone(model, example) -> torch.Tensor:
    return model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_padding_free_loss_equals_padded_loss(data, examples, impl):
    model = tiny(data, impl)
    padded, packed = padded_batch(data, examples), packed_batch(examples, impl)
    assert packed["input_ids"].shape == (1, sum(len(ex["input_ids"]) for ex in examples))
    # The same targets: each document's first token is predicted by nothing in either batch.
    assert (padded["labels"][:, 1:] != -100).sum() == (packed["labels"][:, 1:] != -100).sum()
    loss_padded, loss_packed = model(**padded).loss, model(**packed).loss
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_padding_free_logits_equal_each_document_alone(data, examples, impl):
    from hftrain.packing import split_documents

    model = tiny(data, impl)
    packed = packed_batch(examples, impl)
    per_doc = split_documents(model(**packed).logits, packed["position_ids"])
    assert len(per_doc) == len(examples)
    for logits, example in zip(per_doc, examples):
        torch.testing.assert_close(logits, alone(model, example), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_changing_one_document_leaves_the_others_untouched(data, examples, impl):
    from hftrain.packing import split_documents

    model = tiny(data, impl)
    changed = [{"input_ids": [(t * 7 + 3) % len(data.tokenizer) for t in examples[0]["input_ids"]]}, *examples[1:]]
    before, after = (packed_batch(x, impl) for x in (examples, changed))
    docs_before = split_documents(model(**before).logits, before["position_ids"])
    docs_after = split_documents(model(**after).logits, after["position_ids"])
    assert not torch.allclose(docs_before[0], docs_after[0])
    for b, a in zip(docs_before[1:], docs_after[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_position_ids_alone_leak_across_documents(data, examples, impl):
    """The finding behind the GPU probe's 10.5750 vs 10.5705: transformers 5 builds the block-diagonal mask for
    sdpa/eager from position_ids only when no attention_mask and no KV cache are passed (masking_utils.
    _preprocess_mask_arguments). Llama's config has use_cache=True, so a plain forward creates a cache and
    documents attend to the earlier ones; an all-ones attention_mask does the same. PaddingFreeCollator passes
    use_cache=False. If this test fails, transformers changed: update hftrain/packing.py and the README."""
    from hftrain.packing import split_documents

    model = tiny(data, impl)
    assert model.config.use_cache  # the default this relies on
    packed = packed_batch(examples, impl)
    reference = [alone(model, ex) for ex in examples]
    bare = {k: packed[k] for k in ("input_ids", "position_ids", "labels")}
    ones = torch.ones_like(packed["input_ids"])
    for leaky in (bare, {**packed, "attention_mask": ones}):
        docs = split_documents(model(**leaky).logits, packed["position_ids"])
        torch.testing.assert_close(docs[0], reference[0], rtol=1e-5, atol=1e-5)  # the first sees nothing before it
        assert max((d - r).abs().max().item() for d, r in zip(docs[1:], reference[1:])) > 1e-2
        assert model(**leaky).loss.item() != pytest.approx(model(**packed).loss.item(), rel=1e-4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_right_padding_needs_no_attention_mask(data, examples, impl):
    """math_kernel.py and benchmarks/attention.py drop the mask of right-padded batches, so SDPA can run is_causal kernels."""
    model = tiny(data, impl)
    padded = padded_batch(data, examples)
    assert data.tokenizer.padding_side == "right"
    with_mask = model(**padded)
    without = model(**{k: v for k, v in padded.items() if k != "attention_mask"})
    assert without.loss.item() == pytest.approx(with_mask.loss.item(), rel=1e-6)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(without.logits[real], with_mask.logits[real], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() and is_flash_attn_2_available(), reason="FA2 is available here")
def test_flash_attention_refuses_without_flash_attn_or_gpu(tmp_path):
    proc = run_script("sdpa/flash_attention.py", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "pip install flash-attn --no-build-isolation" in errors[0] and "--attn_implementation sdpa" in errors[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "output").exists()  # stopped before loading anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU-only kernels run here")
def test_math_kernel_refuses_gpu_only_kernel_on_cpu(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as stop:
        run_in_process("sdpa/math_kernel.py", "--backend", "efficient", cwd=tmp_path, monkeypatch=monkeypatch)
    assert str(stop.value.code).startswith("error: the efficient SDPA kernel runs only on CUDA GPUs; on CPU pass --backend math")
    assert not (tmp_path / "data").exists()


def test_math_kernel_learns(workdir):
    out = workdir / "output/sdpa_math_kernel"
    args = ["--max_steps", "150", "--eval_strategy", "no", "--save_strategy", "no", "--output_dir", str(out)]
    run_script("sdpa/math_kernel.py", *args, cwd=workdir, **FAST)
    metrics = read_metrics(out)
    assert metrics["sdpa_backend"] == "math"
    assert metrics["eval_accuracy"] >= 0.6, metrics["eval_accuracy"]  # chance is 0.2
    losses = list(train_losses(metrics).values())
    assert losses[-1] < losses[0] / 2


def test_padding_free_training_learns_and_matches_padded_training(workdir):
    """flash_attention.py with sdpa: the packed run learns, and its losses are the padded run's (same batches)."""
    common = ["--attn_implementation", "sdpa", "--max_steps", "150", "--per_device_train_batch_size", "16"]
    common += ["--eval_strategy", "no", "--save_strategy", "no"]
    run_script("sdpa/flash_attention.py", *common, "--output_dir", "output/sdpa_packed", cwd=workdir, **FAST)
    run_script(
        "sdpa/flash_attention.py", *common, "--padding_free", "false", "--output_dir", "output/sdpa_padded", cwd=workdir, **FAST
    )
    packed, padded = read_metrics(workdir / "output/sdpa_packed"), read_metrics(workdir / "output/sdpa_padded")
    assert packed["padding_free"] and not padded["padding_free"]
    assert packed["eval_accuracy"] >= 0.6, packed["eval_accuracy"]
    assert packed["train_tokens"] == padded["train_tokens"]  # both count real tokens only
    # Same documents, same targets, same mask per document: only the order of float sums differs.
    assert train_losses(packed) == pytest.approx(train_losses(padded), rel=1e-4)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-3)


def test_compare_smoke(tmp_path, monkeypatch, capsys):
    run_in_process("benchmarks/attention.py", "--smoke", "--output_dir", str(tmp_path), cwd=tmp_path, monkeypatch=monkeypatch)
    report = json.loads((tmp_path / "compare.json").read_text())
    ok = {r["case"]: r for r in report["results"] if r["status"] == "ok"}
    assert set(ok) == {"eager", "sdpa math"} and all(r["ms"] > 0 for r in ok.values())
    assert ok["eager"]["loss"] == pytest.approx(ok["sdpa math"]["loss"], rel=1e-5)  # same function, two implementations
    assert all(r["reason"] for r in report["results"] if r["status"] == "skipped")
    assert {"device", "gpu_count", "versions", "date"} <= report.keys()
    assert "| eager |" in (tmp_path / "compare.md").read_text() and (tmp_path / "compare.png").stat().st_size > 0
    assert "done: 2 measurements" in capsys.readouterr().out


def test_packed_rows_train_and_count_every_real_token(workdir):
    """--pack_rows: whole documents packed into rows of at most N tokens, then flattened padding-free."""
    out = workdir / "output/sdpa_rows"
    args = ["--attn_implementation", "sdpa", "--pack_rows", "256", "--per_device_train_batch_size", "2", "--max_steps", "30"]
    run_script("sdpa/flash_attention.py", *args, "--eval_strategy", "no", "--output_dir", str(out), cwd=workdir, **FAST)
    m = read_metrics(out)
    # Rows of whole ~40-token reviews fill 256 almost completely: each step carries close to 2 x 256 real tokens.
    assert 0.9 * 2 * 256 * 30 <= m["train_tokens"] <= 2 * 256 * 30
    losses = list(train_losses(m).values())
    assert m["padding_free"] and losses[-1] < losses[0]  # it learns

    proc = run_script("sdpa/flash_attention.py", "--pack_rows", "256", "--padding_free", "false", cwd=workdir, check=False)
    assert proc.returncode == 1 and "error: --pack_rows builds padding-free batches" in proc.stderr


def test_fp8_refuses_without_float8_tensor_cores(tmp_path):
    from hftrain.quantization import has_float8_tensor_cores

    if has_float8_tensor_cores():
        pytest.skip("this GPU has float8 tensor cores")
    proc = run_script("sdpa/flash_attention.py", "--attn_implementation", "sdpa", "--fp8", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: --fp8 needs float8 tensor cores (compute capability 8.9+" in proc.stderr
    assert not (tmp_path / "data").exists()  # stopped before loading anything


def test_float8_training_converts_the_decoder_trains_and_saves_a_plain_model(data, tmp_path):
    """torchao's Float8Linear in emulation (the same casts and scales, without float8 hardware): the decoder's
    linear layers are swapped, the output layer is not, training moves the loss, and the checkpoint is a
    plain Llama with the same keys, which reloads to the same outputs."""
    from torchao.float8.float8_linear import Float8Linear
    from transformers import AutoModelForCausalLM

    from hftrain.data import PadCollator
    from hftrain.models import load_model
    from hftrain.quantization import float8_training

    torch.manual_seed(0)
    model = load_model("tiny", data.tokenizer, attn_implementation="sdpa")
    keys = set(model.state_dict())
    float8_training(model, emulate=True)
    swapped = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(swapped) == 7 * model.config.num_hidden_layers and not isinstance(model.lm_head, Float8Linear)
    batch = PadCollator(data.tokenizer)([data.train[i] for i in range(16)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert set(plain.state_dict()) == keys
    with torch.no_grad():
        # float8 (emulated) against full precision: the same function up to float8 rounding
        torch.testing.assert_close(plain(**batch).loss, model(**batch).loss, rtol=0.05, atol=0)


def test_fp8_refuses_without_torchao(monkeypatch):
    """On a float8-capable GPU without torchao, --fp8 says what to install (checked in-process: CI has neither)."""
    import importlib.util
    from types import SimpleNamespace

    from hftrain.errors import UserError

    spec = importlib.util.spec_from_file_location("flash_attention_script", SCRIPTS / "sdpa/flash_attention.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "has_float8_tensor_cores", lambda: True)
    monkeypatch.setattr(script, "find_spec", lambda name: None)
    args = script.AttentionArguments(attn_implementation="sdpa", fp8=True)
    with pytest.raises(UserError, match=r'--fp8 needs torchao: pip install -e "\.\[fp8\]"'):
        script.check_flash_attention(args, SimpleNamespace(n_gpu=0))


def test_flash_attention_technique_is_on_the_first_screen():
    """The attention implementation, the padding-free collator and the recipe's flags, in main() right after the imports."""
    screen = first_screen("sdpa/flash_attention.py")
    for lesson in ("attn_implementation=args.attn_implementation", "PaddingFreeCollator(", "recipe(args, training_args)"):
        assert lesson in screen, lesson
    for flag in ("speed.fp8", "speed.compile_layers", "args.pack_rows"):
        assert flag in screen, flag
