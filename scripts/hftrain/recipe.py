"""The project's fast training recipe with documents isolated, defined once.

`scripts/sdpa/flash_attention.py` turns its flags into a `Recipe`; `scripts/benchmarks/throughput.py`'s recipe cases
launch that script with those flags (tests/test_benchmark.py checks they are the docstring's). The pieces:

- rows of whole documents (`packed_rows`), flattened padding-free, attention within each document
  (FlashAttention-2's varlen kernel, the boundaries handed over once per batch as `cu_seq_lens_*`);
- each decoder layer compiled (regional compilation: one graph reused by every layer), on a fixed
  batch length so that it compiles once;
- Liger's fused linear + cross-entropy alone: the logits (tokens x vocabulary, 8 GiB in bf16 for
  32k tokens and a 128k vocabulary) are never stored whole. Liger's RMSNorm, SwiGLU and RoPE kernels
  stay off: the compiled layers already fuse those operations, faster;
- optionally float8 matmuls in the decoder (torchao, tensorwise scales; the output layer stays bf16).
"""

from dataclasses import dataclass
from typing import Any

from hftrain.packing import PackedRowsCollator

FUSED_LOSS_ONLY = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False, "swiglu": False, "rope": False}


@dataclass(frozen=True)
class Recipe:
    attn_implementation: str = "flash_attention_2"
    pack_rows: int = 2048  # tokens per packed row
    rows: int = 16  # packed rows per GPU and step (the micro-batch)
    compile_layers: bool = True
    fp8: bool = False
    fused_loss: bool = True

    def training_arguments(self) -> dict[str, Any]:
        """The TrainingArguments fields the recipe sets."""
        return {
            "per_device_train_batch_size": self.rows,
            "optim": "adamw_torch_fused",
            "use_liger_kernel": self.fused_loss,
            "liger_kernel_config": dict(FUSED_LOSS_ONLY) if self.fused_loss else None,
            "remove_unused_columns": False,  # packed rows carry `documents`, which the model does not take
        }

    def collator(self, pad_token_id: int) -> PackedRowsCollator:
        # compiled layers get one fixed length (rows x pack_rows), else every new batch length recompiles
        pad_to = self.rows * self.pack_rows if self.compile_layers else None
        return PackedRowsCollator(self.attn_implementation, pad_to=pad_to, pad_token_id=pad_token_id)
