"""Attention implementations compared: forward+backward time and peak memory against sequence length.

Runs one training step (forward and backward, no optimizer) of the same model on the same documents
with: eager; SDPA forced to its math, memory-efficient, flash and cuDNN kernels; SDPA padding-free;
FlashAttention-2 on padded batches; FlashAttention-2 padding-free. Every batch holds about the same
number of tokens (--tokens_per_batch) as documents of random length between T/4 and T, so what
grows with the sequence length T is attention's T^2 cost alone.

    python scripts/benchmarks/attention.py          # one CUDA GPU, a few minutes on an H100 (FA2 needs flash-attn)
    python scripts/benchmarks/attention.py --smoke  # CPU, seconds: tiny preset, eager and SDPA math, one length

Writes results/attention/compare.json (every measurement, device, versions, date), compare.md (the
table) and compare.png (time and memory against T). Cases that cannot run say why: OOM (and then
longer T is not tried), "skipped" (flash-attn missing, a kernel this PyTorch or GPU lacks).

How each case gets its batch, and why:
- eager and SDPA: right-padded rows without an attention_mask, so SDPA is called with is_causal=True, a
  form every kernel accepts (flash takes no explicit mask); the causal mask already hides the right padding from
  every real token, so the loss is the same. Padding is computed, as in any padded batch.
- FA2 padded: the same rows with their attention_mask: FA2 unpads inside attention, but every other
  layer still runs on the padding.
- SDPA padding-free: the documents concatenated into one row (hftrain.packing); transformers masks it with a
  block-diagonal T x T mask over the whole row, so attention costs grow with the documents per row.
- FA2 padding-free: the same row, but FA2's varlen kernel attends within each document only: no padding
  anywhere and no mask.
All cases compute the same loss up to bf16 rounding, a coarse check (a random model's loss moves by only
~0.1% when documents leak into each other; tests/test_attention.py compares logits per document).

Docs: https://docs.pytorch.org/docs/stable/generated/torch.nn.attention.sdpa_kernel.html
      https://huggingface.co/docs/transformers/perf_infer_gpu_one
      https://huggingface.co/blog/packing-with-FA2
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import gc
import json
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as hf_sdpa
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, set_seed
from transformers.utils import is_flash_attn_2_available

from hftrain.benchmarking import machine, output_dir, save_figure, subplots
from hftrain.errors import UserError
from hftrain.models import PRESETS
from hftrain.packing import PaddingFreeCollator
from hftrain.reporting import device_name

# name: (attn_implementation, SDPA kernel or None, padding-free)
CASES: dict[str, tuple[str, SDPBackend | None, bool]] = {
    "eager": ("eager", None, False),
    "sdpa math": ("sdpa", SDPBackend.MATH, False),
    "sdpa efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION, False),
    "sdpa flash": ("sdpa", SDPBackend.FLASH_ATTENTION, False),
    "sdpa cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION, False),
    "sdpa padding-free": ("sdpa", None, True),  # SDPA's own kernel choice, block-diagonal mask over the packed row
    "fa2 padded": ("flash_attention_2", None, False),
    "fa2 padding-free": ("flash_attention_2", None, True),
}
SMOKE_CASES = ("eager", "sdpa math")


@dataclass
class Arguments:
    model: str = field(default="small", metadata={"help": "A preset: tiny, small (~150M with a 32k vocabulary) or 1b."})
    seq_lens: list[int] = field(
        default_factory=lambda: [512, 1024, 2048, 4096, 8192], metadata={"help": "Sequence lengths T to measure."}
    )
    tokens_per_batch: int = field(default=16384, metadata={"help": "Batch size = tokens_per_batch // T rows (8 x 2048)."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary of the random model (a real LM head's cost)."})
    warmup: int = field(default=2, metadata={"help": "Untimed steps per case (kernel selection, cuDNN plans, allocator)."})
    iters: int = field(default=5, metadata={"help": "Timed steps per case; the median is reported."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Default: results/attention (output/benchmarks/attention-smoke with --smoke)."}
    )
    smoke: bool = field(default=False, metadata={"help": "CPU check in seconds: tiny preset, eager and SDPA math, T=128."})
    seed: int = field(default=0, metadata={"help": "Seed for the weights and the documents."})


def make_documents(seq_len: int, tokens_per_batch: int, vocab: int, seed: int) -> list[list[int]]:
    """tokens_per_batch // seq_len documents of random length in [T/4, T]; the first is T long, so rows pad to T."""
    rng = random.Random(seed + seq_len)
    n = max(1, tokens_per_batch // seq_len)
    lengths = [seq_len] + [rng.randint(seq_len // 4, seq_len) for _ in range(n - 1)]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


def padded_batch(docs: list[list[int]], with_mask: bool) -> dict[str, Any]:
    length = max(map(len, docs))
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "use_cache": False}
    if with_mask:
        batch["attention_mask"] = mask
    return batch


def probe(name: str, model: Any, device: torch.device, dtype: torch.dtype) -> tuple[str | None, bool]:
    """(why the case cannot run here or None, whether its SDPA kernel takes grouped-query attention as is)."""
    impl, backend, _ = CASES[name]
    if impl == "flash_attention_2":
        if device.type != "cuda":
            return "FlashAttention-2 needs a CUDA GPU", True
        if not is_flash_attn_2_available():
            return "flash-attn not installed (pip install flash-attn --no-build-isolation)", True
        return None, True
    if backend is None:
        return None, True
    cfg = model.config
    q = torch.randn(1, cfg.num_attention_heads, 64, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(1, cfg.num_key_value_heads, 64, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    error = ""
    for gqa in (True, False):  # some PyTorch releases' kernels lack GQA: then transformers repeats the K/V heads
        k = kv if gqa else kv.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=gqa).sum().backward()
            return None, gqa
        except RuntimeError as e:
            error = str(e).splitlines()[0][:100]
    return f"this PyTorch cannot run the {backend.name} kernel on {device.type} ({error})", False


@contextmanager
def kernel(name: str, gqa: bool) -> Iterator[None]:
    """Restrict SDPA to the case's kernel; without GQA support, have transformers repeat the K/V heads."""
    backend = CASES[name][1]
    if backend is None:
        yield
        return
    use_gqa = hf_sdpa.use_gqa_in_sdpa
    if not gqa:
        hf_sdpa.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        with sdpa_kernel(backend):
            yield
    finally:
        hf_sdpa.use_gqa_in_sdpa = use_gqa


def measure(model: Any, batch: dict[str, Any], warmup: int, iters: int, device: torch.device) -> dict[str, Any]:
    """Median forward+backward time (CUDA events on GPU), peak memory and the loss of one step."""
    times, loss = [], float("nan")
    for i in range(warmup + iters):
        if i == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            elapsed_ms = start.elapsed_time(end)
        else:
            elapsed_ms = (time.perf_counter() - t0) * 1000
        loss = out.loss.item()
        del out
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(elapsed_ms)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"ms": round(statistics.median(times), 2), "peak_memory_gib": peak and round(peak, 3), "loss": loss}


def run_case(name: str, gqa: bool, model: Any, docs: list[list[int]], args: Arguments, device: torch.device) -> dict[str, Any]:
    impl, _, padding_free = CASES[name]
    model.set_attn_implementation(impl)
    if padding_free:
        batch = PaddingFreeCollator(impl)([{"input_ids": d} for d in docs])
    else:
        batch = padded_batch(docs, with_mask=impl == "flash_attention_2")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    real = sum(map(len, docs))
    row: dict[str, Any] = {"batch_shape": list(batch["input_ids"].shape), "real_tokens": real}
    oom = False
    try:
        with kernel(name, gqa):
            row.update(measure(model, batch, args.warmup, args.iters, device))
        row["status"] = "ok"
        row["real_tokens_per_s"] = round(real / row["ms"] * 1000)
    except torch.OutOfMemoryError:
        oom = True
    except RuntimeError as e:  # e.g. a kernel that refuses this shape: report it, keep measuring the others
        row.update(status="error", reason=str(e).splitlines()[0][:160])
    if oom:  # outside the except block, so the traceback no longer holds the activations
        row.update(status="OOM")
        model.zero_grad(set_to_none=True)
    del batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def write_markdown(report: dict[str, Any], path: Path) -> None:
    seq_lens = report["seq_lens"]
    rows = report["results"]
    lines = [
        f"Forward+backward of one batch ({report['tokens_per_batch']:,} tokens, documents of T/4 to T tokens) "
        f"on {report['device']}, model `{report['model']}` ({report['parameters'] / 1e6:.1f}M parameters, {report['dtype']}); "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"flash-attn {report['versions']['flash-attn']}; {report['date'][:10]}. "
        "Median time, peak memory; OOM: out of memory.",
        "",
        "| implementation | " + " | ".join(f"T={t}" for t in seq_lens) + " |",
        "|---|" + "---|" * len(seq_lens),
    ]
    for name in CASES:
        cells = []
        for t in seq_lens:
            r = next((r for r in rows if r["case"] == name and r["seq_len"] == t), None)
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                mem = f" / {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
                cells.append(f"{r['ms']:.1f} ms{mem}")
            else:
                cells.append(r["status"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # The same documents and targets in every case: the losses agree up to rounding unless something attends
    # across documents or to padding.
    lines += ["", "Loss of the batch (the same function everywhere: equal up to rounding):", ""]
    lines += ["| implementation | " + " | ".join(f"T={t}" for t in seq_lens) + " |", "|---|" + "---|" * len(seq_lens)]
    for name in CASES:
        losses = [
            next((f"{r['loss']:.4f}" for r in rows if r["case"] == name and r["seq_len"] == t and "loss" in r), "")
            for t in seq_lens
        ]
        if any(losses):
            lines.append(f"| {name} | " + " | ".join(losses) + " |")
    reasons = {r["case"]: r["reason"] for r in rows if r.get("reason")}
    lines += [""] + [f"- {name}: {why}" for name, why in reasons.items()]
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    fig, (ax_t, ax_m) = subplots(1, 2, figsize=(11, 4))
    for name in CASES:
        ok = [r for r in report["results"] if r["case"] == name and r["status"] == "ok"]
        if ok:
            ax_t.plot([r["seq_len"] for r in ok], [r["ms"] for r in ok], "o-", label=name)
            ax_m.plot([r["seq_len"] for r in ok], [r["peak_memory_gib"] for r in ok], "o-", label=name)
    ax_t.set(xlabel="sequence length T", ylabel="forward+backward (ms)", xscale="log", yscale="log")
    ax_m.set(xlabel="sequence length T", ylabel="peak memory (GiB)", xscale="log")
    for ax in (ax_t, ax_m):
        ax.set_xticks(report["seq_lens"], [str(t) for t in report["seq_lens"]])
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device']}, {report['tokens_per_batch']:,} tokens per batch")
    save_figure(fig, path)


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if args.smoke:
        args.model, args.seq_lens, args.tokens_per_batch, args.vocab_size = "tiny", [128], 512, 1024
        args.warmup, args.iters = 1, 2
    elif not torch.cuda.is_available():
        raise UserError(
            "the attention benchmark measures GPU kernels: run it on a CUDA GPU, or pass --smoke for a quick CPU check"
        )
    if args.model not in PRESETS:
        raise UserError(f"--model {args.model}: pass a preset ({', '.join(PRESETS)})")
    out = output_dir("attention", args.smoke, args.output_dir or "")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    set_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab_size, **PRESETS[args.model])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)

    report = {
        **machine("torch", "transformers", "flash-attn"),
        "device": device_name() if device.type == "cuda" else "cpu",  # --smoke runs on the CPU, GPU or not
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "seq_lens": args.seq_lens,
        "tokens_per_batch": args.tokens_per_batch,
        "arguments": asdict(args),
        "results": [],
    }
    results: list[dict[str, Any]] = report["results"]
    out.mkdir(parents=True, exist_ok=True)
    for name in tqdm(CASES, desc="cases"):
        in_run = not args.smoke or name in SMOKE_CASES
        reason, gqa = probe(name, model, device, dtype) if in_run else ("not part of --smoke", True)
        for t in args.seq_lens:
            row: dict[str, Any] = {"case": name, "seq_len": t}
            earlier = [r for r in results if r["case"] == name and r["status"] == "OOM"]
            if reason:
                row.update(status="skipped", reason=reason)
            elif earlier:
                row.update(status="OOM", reason=f"out of memory already at T={earlier[0]['seq_len']}")
            else:
                docs = make_documents(t, args.tokens_per_batch, args.vocab_size, args.seed)
                row.update(run_case(name, gqa, model, docs, args, device))
            results.append(row)
            done = f"{row['ms']:9.1f} ms  loss {row['loss']:.4f}" if row["status"] == "ok" else row.get("reason", "")
            tqdm.write(f"{name:>17} T={t:<5} {row['status']:>7} {done}")
        # Written after every case, so a crash (or a time limit) keeps what was measured.
        (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "compare.md")
    write_plot(report, out / "compare.png")
    print(f"done: {sum(r['status'] == 'ok' for r in results)} measurements | {out}/compare.json, compare.md, compare.png")


if __name__ == "__main__":
    main()
