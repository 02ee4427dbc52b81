"""PyTorch SDPA with a chosen kernel: the math kernel (the default here), flash, memory-efficient or cuDNN.

Teaches `attn_implementation="sdpa"`: transformers calls `torch.nn.functional.scaled_dot_product_attention`,
and PyTorch picks a kernel per call (cuDNN on H100-class GPUs, else flash, then memory-efficient,
then math). `torch.nn.attention.sdpa_kernel(...)` restricts that choice for everything run inside it,
here the whole of training and evaluation. The math kernel is SDPA written in plain PyTorch ops: it
materialises the T x T score matrix (memory grows with T^2), but runs on every device and dtype
with any mask, so it is the reference for numerics and debugging. The fused kernels never build that
matrix, but have conditions: efficient and cuDNN need CUDA, flash on a GPU needs bf16/fp16 and takes
no explicit mask, all limit the head size.

    python scripts/sdpa/math_kernel.py                                # math kernel, CPU or every GPU
    python scripts/sdpa/math_kernel.py --model small --backend flash  # one kernel per run: math, flash, efficient, cudnn
    accelerate launch --config_file accelerate_config.yaml \\
        scripts/sdpa/math_kernel.py --model small --backend efficient # every GPU (DDP)

On CPU PyTorch has two SDPA kernels, math and flash (a CPU flash kernel); efficient and cudnn need
CUDA. `torch.backends.cuda.sdp_kernel(...)`, seen in older code, is the deprecated form of `sdpa_kernel`.
scripts/benchmarks/attention.py times all of them against FlashAttention-2.

Docs: https://docs.pytorch.org/docs/stable/generated/torch.nn.attention.sdpa_kernel.html
      https://docs.pytorch.org/docs/stable/generated/torch.nn.functional.scaled_dot_product_attention.html
      https://huggingface.co/docs/transformers/perf_infer_gpu_one#pytorch-scaled-dot-product-attention
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as hf_sdpa
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import TrainingArguments, set_seed

from hftrain.cli import ScriptArguments
from hftrain.data import PadCollator
from hftrain.errors import UserError
from hftrain.models import load_model
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary

BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


@dataclass
class MathKernelArguments(ScriptArguments):
    backend: str = field(
        default="math",
        metadata={
            "help": "The only SDPA kernel allowed: math (any device), flash (CUDA bf16/fp16, or CPU), efficient or cudnn (CUDA).",
            "choices": list(BACKENDS),
        },
    )


def main() -> None:
    args, training_args, checkpoint = parse_args(MathKernelArguments, check=check_backend, output_dir="output/sdpa/math_kernel")
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    data.tokenizer.padding_side = "right"  # CausalPadCollator relies on it
    model = load_model(args.model, data.tokenizer, attn_implementation="sdpa", trust_remote_code=args.trust_remote_code)
    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    check_kernel(args.backend, model.config, training_args.device, compute_dtype)

    collator = CausalPadCollator(data.tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    trainer = build_trainer(model, training_args, data, data_collator=collator)
    # Every attention call inside runs on the chosen kernel; if it cannot (say flash with an explicit mask),
    # PyTorch raises "No available kernel" instead of quietly falling back to another one.
    with sdpa_kernel(BACKENDS[args.backend]):
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        eval_metrics = trainer.evaluate()
    trainer.save_model()
    write_run_summary(trainer, data, train_result, eval_metrics, sdpa_backend=args.backend)


def check_backend(args: MathKernelArguments, training_args: TrainingArguments) -> None:
    if args.backend in ("efficient", "cudnn") and not torch.cuda.is_available():
        raise UserError(f"the {args.backend} SDPA kernel runs only on CUDA GPUs; on CPU pass --backend math or --backend flash")


class CausalPadCollator(PadCollator):
    """Right-padded batches without an attention_mask.

    Right padding puts every pad token after the real tokens, and causal attention never looks ahead,
    so the causal mask alone already hides the padding from every real token; pad positions compute
    throwaway values whose labels are -100. Without a mask transformers calls SDPA with
    `is_causal=True`, the one form every kernel accepts (flash refuses any explicit mask, cuDNN some).
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        del batch["attention_mask"]
        return batch


def check_kernel(backend: str, config: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Run one tiny attention step of the model's shape on the kernel, so a mismatch stops here, not mid-training."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads  # fewer: grouped-query attention (GQA)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = torch.randn(1, heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(1, kv_heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)

    def runs(k: torch.Tensor, **kwargs: Any) -> bool:
        try:
            with sdpa_kernel(BACKENDS[backend]):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, **kwargs).sum().backward()
            return True
        except RuntimeError:
            return False

    if runs(kv, enable_gqa=True):
        return
    if runs(kv.repeat_interleave(heads // kv_heads, dim=1)):
        # Some PyTorch releases' kernels (e.g. efficient) lack grouped-query attention (fewer K/V heads than query
        # heads): let transformers repeat the K/V heads itself instead of passing enable_gqa=True.
        hf_sdpa.use_gqa_in_sdpa = lambda *args, **kwargs: False
        return
    raise UserError(
        f"the {backend} SDPA kernel cannot train this model on {device.type} in {dtype} (head size {head_dim}); "
        "pick another --backend (math runs everywhere; flash, efficient and cudnn need a recent CUDA GPU and bf16)"
    )


if __name__ == "__main__":
    main()
