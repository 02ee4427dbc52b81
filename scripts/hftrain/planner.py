"""What fits on which GPUs, and how fast: the closed-form model behind scripts/plan.py, calibrated on results/.

Memory per GPU is a sum of terms, each a count times bytes:
- weights, gradients, optimizer state: bytes per parameter of the method (full AdamW, 8-bit AdamW, GaLore, LoRA,
  QLoRA) in the precision the example trains in, divided by the GPUs for FSDP2 and ZeRO-3;
- activations: elements saved per token and decoder layer (the inputs and outputs of each layer's linear layers,
  norms and activation function, counted from the model's shapes) times a factor measured per kernel setup
  (`ACTIVATION_FACTOR`); with checkpointing, each layer's input only, plus one layer recomputed in backward;
- logits and loss: tokens x vocabulary x the bytes HF's loss holds per logit, or nearly nothing with the fused loss;
- buffers: bf16 copies of the weights that autocast or FSDP2 make, 4-bit dequantisation, CUDA workspaces.
Time per step is FLOPs (reporting.flops_per_token, the harness's own formula) over the GPU's datasheet peak times the
MFU measured for that recipe here (`efficiency()`, fitted on CALIBRATION_FILES), plus the unfused loss's memory
traffic over the GPU's bandwidth (`loss_traffic_seconds`), plus the per-step overhead measured for the example scripts.
Every constant is traced to its source in docs/planner.md.
"""

import math
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from hftrain.errors import UserError
from hftrain.gpus import BY_KEY, GPU, gpu_by_device_name
from hftrain.models import PRESETS, load_config, preset_config
from hftrain.reporting import flops_per_token

GIB = 2**30
# The embedded default's tokenizer has 596 tokens; presets without a vocabulary of their own round it up to 640.
EMBEDDED_VOCAB = 640
LORA_RANK = 16  # every LoRA/QLoRA example's --lora_r default

# ---- calibration: measured here (docs/planner.md says which rows each comes from) ---------------------------------
# Activation elements per token and layer are counted from the shapes (`Shape.layer_activations`); the measured
# factor per kernel setup says how much of that a setup really keeps (compiled layers and Liger keep less).
ACTIVATION_FACTOR = {
    # autocast (float32 weights, bf16 compute: the Trainer's bf16=True on one GPU or under DDP)
    "plain": 1.325,  # eager PyTorch ops with SDPA's or FA2's fused attention: P1, P2, FA2 padded/padding-free
    "liger": 0.965,  # Liger's RMSNorm, SwiGLU, RoPE kernels (and its fused loss)
    "compiled": 0.836,  # each decoder layer compiled (or the whole model)
    "compiled+liger": 0.94,
    "compiled+fp8": 0.581,  # float8 linear layers keep float8 copies of their inputs
    "qlora": 1.66,  # 4-bit base after prepare_model_for_kbit_training: float32 norms, embeddings, hidden states
    # computed in bf16 (FSDP2's gathered bf16 weights, ZeRO-3, bf16 weights): no float32 residual stream
    "plain, bf16": 1.265,
    "liger, bf16": 0.759,
    "adapter, bf16": 1.0,  # LoRA or QLoRA on a bf16 base
}
# Bytes per score element per layer the non-fused attentions keep (T x T per head): eager, SDPA's math kernel.
SCORE_BYTES = {"eager": 5.84, "math": 4.33}
# SDPA on packed rows builds a block-diagonal mask over the whole row: bytes per (row tokens)^2.
MASK_BYTES = 20.4
# Bytes per logit that HF's loss holds at its peak (bf16 logits, their float32 copy, log-softmax, gradient).
LOGIT_BYTES = 13.5
# Bytes each logit moves through memory in HF's unfused loss (ForCausalLMLoss under autocast), counted kernel by kernel:
# the output layer writes bf16 (2); logits.float() reads and writes (2 + 4); log_softmax reads and writes (4 + 4);
# backward, nll_loss fills its gradient (4), log_softmax's backward reads two and writes one (12), the cast back to bf16
# reads and writes (4 + 2). These kernels do no matmul work: their time is this traffic over the memory bandwidth.
LOSS_TRAFFIC_BYTES = 38
FUSED_LOSS_BYTES_PER_TOKEN_HIDDEN = 11.1  # Liger's fused linear + cross-entropy: the input's gradient, float32
# The synthetic-long documents (256-2048 tokens) the harnesses train on: mean length (results/throughput P1 rows:
# 8,243.3 real tokens per 8 documents) and the expected longest of a micro-batch, which padded batches pad to.
MEAN_DOCUMENT = 1030.4
LONGEST_DOCUMENT = MEAN_DOCUMENT / 36 * 64  # 64 reviews (hftrain.task.make_documents), what the padded rows reach
ADAM_8BIT_BYTES = 2.04  # results/memory: 1.851 GiB of 8-bit AdamW state for 974M parameters
# The recomputed layer's activations (and their gradients) during backward, in layers: the model's own gradient
# checkpointing (transformers) and FSDP's activation checkpointing (a checkpoint wrapper per decoder layer)
CHECKPOINT_RECOMPUTE = {"hf": 1.254, "fsdp": 1.025}
CUDA_CONTEXT_GIB = 0.75  # CUDA context and cuBLAS/NCCL workspaces, outside max_memory_allocated
# A plan fits when its predicted peak, times the allocator's reserve (reserved / allocated on the packed and block rows
# of results/throughput: 1.01-1.02) and the planner's worst memory error over the committed rows (9.5%), plus the
# CUDA context, is within the GPU's memory: what it calls a fit should fit.
FIT_MARGIN = 1.02 * 1.095
WORKSPACE_GIB = 0.31  # cuBLAS workspace and small buffers inside max_memory_allocated


@dataclass(frozen=True)
class Efficiency:
    """Seconds per step = tokens x (dense FLOPs / (peak x mfu) + attention FLOPs / (peak x attention_mfu)) + overhead_s.
    FLOPs per token are the harness's 6N + 12·L·d·T (reporting.flops_per_token); dense = its value at T = 0."""

    mfu: float  # fraction of the GPU's bf16 datasheet peak the recipe's FLOPs ran at
    attention_mfu: float = 0.0  # the same for the 12·L·d·T part, where measured apart (the attention benchmark)
    overhead_s: float = 0.0  # per optimizer step, outside the FLOPs (the example scripts: padding, logging, first step)
    rows: int = 0  # committed rows it was fitted on


# The committed results the planner is calibrated on (files added later are checked against it, not fitted).
CALIBRATION_FILES = (
    "results/throughput/benchmark.json",
    "results/throughput/recipe.json",
    "results/throughput/llama-3.2-1b.json",
    "results/throughput/llama-3.2-1b-profile.json",
    "results/throughput/scaling_4gpu.json",
    "results/throughput/scaling_4gpu_zero3.json",
    "results/memory/memory.json",
    "results/sharded/sharded.json",
    "results/sharded/sharded_qlora.json",
    "results/sharded/sharded_small.json",
    "results/attention/compare.json",
)
# Where a plan runs a recipe on several GPUs, per-GPU tokens/s against one GPU, measured (results/throughput
# scaling_4gpu*.json: DDP 93% on 2 and 4 H200s, FSDP2 100-101%, ZeRO-3 89% on 2 and 83% on 4, FSDP2 + QLoRA 86% on 4);
# beyond 4 GPUs the 4-GPU figure is kept, and across machines INTER_NODE is assumed (not measured here).
SCALING = {"none": {2: 0.93, 4: 0.93}, "fsdp2": {2: 1.0, 4: 1.0}, "zero3": {2: 0.89, 4: 0.83}}
INTER_NODE = 0.9
# Activation checkpointing recomputes each layer's forward in backward: 4 passes of work instead of 3 (Korthikanti
# et al. 2022), so 3/4 of the throughput where the recipe was measured without it.
CHECKPOINT_SPEED = 0.75


def scaling(sharding: str, gpus: int, gpus_per_node: int) -> float:
    if gpus <= 1:
        return 1.0
    table = SCALING[sharding]
    factor = table[max(k for k in table if k <= gpus)] if gpus >= 2 else 1.0
    return factor * (INTER_NODE if gpus > gpus_per_node else 1.0)


# ---- the model's shape ----------------------------------------------------------------------------------------------


class _EmbeddedVocab:
    """What preset_config reads of a tokenizer, for presets that take the embedded tokenizer's vocabulary."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass
class Shape:
    name: str
    config: Any = field(repr=False)
    meta_model: Any = field(repr=False)
    params: int
    embedding: int  # vocabulary x hidden (the input embedding; the output layer too if tied)
    untied_head: int  # the output layer's weights when not tied to the embedding
    decoder_linear: list[tuple[int, int]]  # (in, out) of every linear layer inside the decoder layers
    flops: dict[int, float] = field(default_factory=dict, repr=False)  # flops_per_token by sequence length

    @property
    def layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab(self) -> int:
        return int(self.config.vocab_size)

    @property
    def positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def heads(self) -> int:
        return int(self.config.num_attention_heads)

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self.flops:
            self.flops[seq_len] = flops_per_token(self.meta_model, seq_len)
        return self.flops[seq_len]

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.decoder_linear) // self.layers

    def lora_params(self, rank: int = LORA_RANK) -> int:
        """LoRA on every linear layer of the decoder (PEFT's "all-linear" leaves the output layer out): r x (in + out)."""
        return sum(rank * (i + o) for i, o in self.decoder_linear)

    def layer_activations(self) -> float:
        """Elements one decoder layer saves for backward per token: both norms' inputs (float32: 2 x 2h) and outputs
        (2h), the attention's q, k, v and output (2q + 2kv), the MLP's gate, up, activation and product (4f)."""
        c = self.config
        q = self.heads * (getattr(c, "head_dim", None) or self.hidden // self.heads)
        kv = getattr(c, "num_key_value_heads", None) or self.heads
        kv *= q // self.heads
        return 6 * self.hidden + 2 * q + 2 * kv + 4 * c.intermediate_size


@cache
def load_shape(model: str, vocab_size: int = 0) -> Shape:
    """A preset, a checkpoint folder's config.json or a Hub id's config (no weights); `vocab_size` overrides the
    vocabulary (what a benchmark gave the model)."""
    if model in PRESETS:
        config = preset_config(model, _EmbeddedVocab(EMBEDDED_VOCAB))  # type: ignore[arg-type]
    else:
        config = load_config(model)
    if vocab_size:
        config.vocab_size = vocab_size
    return shape_of(model, config)


def shape_of(name: str, config: Any) -> Shape:
    """The model's parameter counts and linear layers, from a model built on the meta device (no memory, no weights)."""
    if getattr(config, "num_hidden_layers", None) is None:
        raise UserError(f"--model {name} has no decoder layers in its config (num_hidden_layers); pass a causal language model")
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise UserError(f"--model {name} is not a causal language model transformers can build ({type(e).__name__})")
    embedding = meta.get_input_embeddings().weight.numel()
    head = meta.get_output_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    untied_head = 0 if tied or head is None else head.weight.numel()
    layers = meta.get_decoder().layers
    linear = [(m.in_features, m.out_features) for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    params = sum(p.numel() for p in meta.parameters())
    return Shape(name, config, meta, params, embedding, untied_head, linear)


# ---- a training setup: what runs, where ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    method: str = "full"  # full, lora, qlora, galore, galore8_layerwise, adam8bit
    sharding: str = "none"  # none (one GPU or DDP), fsdp2, zero3
    gpus: int = 1  # GPUs that share the work (all machines)
    gpus_per_node: int = 1
    precision: str = "mixed"  # mixed: float32 weights under bf16 autocast (the Trainer's bf16=True); bf16: pure bf16
    micro_batch: int = 1  # rows per GPU and step
    seq_len: int = 2048
    batches: str = "packed"  # packed (padding-free / full blocks), padded (rows padded to the longest document)
    attention: str = "flash"  # flash (SDPA fused or FA2), eager, math, mask (SDPA on packed rows)
    liger: bool = False
    compiled: bool = False
    fp8: bool = False
    fused_loss: bool = False  # the logits never exist whole (Liger's fused linear + cross-entropy)
    checkpointing: str = ""  # activation checkpointing: "hf" (the model's gradient_checkpointing), "fsdp" (FSDP's)
    optimizer_step: bool = True  # False: forward + backward only (the attention benchmark)
    galore_rank: int = 128
    efficiency: str = ""  # key into EFFICIENCY
    tokens_per_row: float = 0.0  # real tokens per row (0: seq_len, rows full)
    padded_len: float = 0.0  # the length padded rows are padded to (0: seq_len, what the longest batch of a run has)

    @property
    def shards(self) -> int:
        return self.gpus if self.sharding in ("fsdp2", "zero3") else 1

    def row_tokens(self) -> float:
        """Tokens a row holds in memory (padded rows: up to their longest document)."""
        if self.batches == "padded":
            return self.padded_len or self.seq_len
        return self.tokens_per_row or self.seq_len

    def attention_span(self) -> int:
        """T in the FLOPs' 12·L·d·T: the row length, or for SDPA on packed rows the whole flattened batch, which its
        block-diagonal mask makes it attend over (results/attention: 3x slower than FA2 padding-free)."""
        return round(self.micro_batch * self.row_tokens()) if self.attention == "mask" else self.seq_len

    def real_tokens_per_step(self) -> float:
        return self.micro_batch * (self.tokens_per_row or self.seq_len)


def activation_kind(s: Setup) -> str:
    if s.method == "qlora" and s.sharding == "none":
        return "qlora"  # prepare_model_for_kbit_training casts norms and embeddings to float32: float32 hidden states
    if s.fp8:
        kind = "compiled+fp8"
    elif s.compiled:
        kind = "compiled+liger" if s.liger else "compiled"
    else:
        kind = "liger" if s.liger else "plain"
    if s.method in ("lora", "qlora") and not autocast(s):
        return "adapter, bf16"
    return kind if autocast(s) else kind + ", bf16"


def autocast(s: Setup) -> bool:
    """float32 weights under bf16 autocast (the Trainer's bf16=True on one GPU or DDP): float32 residual stream and
    norms. FSDP2's mixed precision gathers bf16 weights, and ZeRO-3 and the bf16 harnesses compute in bf16."""
    return s.precision == "mixed" and s.sharding == "none"


def galore_state_params(shape: Shape, rank: int) -> float:
    """GaLore's state in parameters: per targeted matrix (m x n), the projection (min x r) and Adam's two moments of
    the r x max projected gradient; everything else keeps plain AdamW moments."""
    projected = sum(min(i, o) * min(rank, min(i, o)) + 2 * min(rank, min(i, o)) * max(i, o) for i, o in shape.decoder_linear)
    rest = shape.params - sum(i * o for i, o in shape.decoder_linear)
    return projected + 2 * rest


def memory_terms(shape: Shape, s: Setup) -> dict[str, float]:
    """Peak memory per GPU in GiB, by term: weights, gradients, optimizer, activations, logits (and loss), buffers."""
    n = s.shards
    linear = sum(i * o for i, o in shape.decoder_linear)
    adapter = shape.lora_params() if s.method in ("lora", "qlora") else 0
    trainable = adapter or shape.params
    wide = 4 if s.precision == "mixed" else 2  # float32 master weights, or bf16 ones
    weights: float
    if s.method == "qlora":
        # NF4: 4 bits per weight + double-quantised absmax (8 bits per 64, fp32 per 256 of those): 0.516 bytes.
        # The rest (embeddings, norms): float32 after prepare_model_for_kbit_training, bf16 under FSDP (no cast).
        weights = linear * 0.516 + (shape.params - linear) * (2 if s.sharding == "fsdp2" else 4)
    elif s.sharding == "zero3":
        weights = shape.params * 2.0  # bf16 partitions; the float32 master copy is optimizer state
    else:
        weights = shape.params * float(wide)
    weights += adapter * 4
    grad_bytes = 4 if adapter or wide == 4 else 2
    gradients = float(trainable * grad_bytes)
    if s.method == "galore8_layerwise":  # updated inside backward: one layer's gradients at a time
        gradients = (shape.layer_linear_params() + shape.params - linear) * grad_bytes
    moment = 4 if adapter or wide == 4 else 2  # torch's AdamW keeps its moments in the weights' dtype
    if not s.optimizer_step:
        optimizer = 0.0
    elif s.method in ("adam8bit", "qlora"):  # bitsandbytes 8-bit (QLoRA: paged) AdamW: 1 byte per moment + scales
        optimizer = trainable * ADAM_8BIT_BYTES
    elif s.method == "galore":
        optimizer = galore_state_params(shape, s.galore_rank) * moment
    elif s.method == "galore8_layerwise":
        optimizer = galore_state_params(shape, s.galore_rank) * ADAM_8BIT_BYTES / 2
    else:
        optimizer = trainable * 2.0 * moment
    if s.sharding == "zero3" and not adapter:
        optimizer = shape.params * (4 + 8.0)  # float32 master weights and moments
    weights, gradients, optimizer = weights / n, gradients / n, optimizer / n

    tokens = s.micro_batch * s.row_tokens()
    factor = ACTIVATION_FACTOR.get(activation_kind(s)) or ACTIVATION_FACTOR[activation_kind(s).split(",")[0]]
    layer = shape.layer_activations() * 2 * factor * tokens
    if s.attention in SCORE_BYTES:
        layer += SCORE_BYTES[s.attention] * s.micro_batch * shape.heads * s.row_tokens() ** 2
    if s.checkpointing:
        residual = 4 if autocast(s) or activation_kind(s) == "qlora" else 2
        activations = shape.layers * tokens * shape.hidden * residual + layer * CHECKPOINT_RECOMPUTE[s.checkpointing]
    else:
        activations = shape.layers * layer
    if s.attention == "mask":
        activations += MASK_BYTES * tokens**2
    if s.fused_loss or s.liger:
        logits = tokens * shape.hidden * FUSED_LOSS_BYTES_PER_TOKEN_HIDDEN
    else:
        logits = tokens * shape.vocab * LOGIT_BYTES

    buffers = WORKSPACE_GIB * GIB
    if autocast(s) and s.method != "qlora":
        # bf16 copies of the float32 weights that autocast makes and backward keeps; with checkpointing, one layer's
        # at a time, and the output layer's
        one = shape.layer_linear_params() if s.checkpointing else linear
        buffers += 2 * (one + shape.embedding + shape.untied_head)
    if s.sharding == "fsdp2":  # a layer gathered (bf16, or 4-bit) and the next one prefetched
        buffers += 2 * (0.516 if s.method == "qlora" else 2) * shape.layer_linear_params()
    if s.method == "qlora":  # a layer's weights dequantised to bf16 at a time
        buffers += 2 * shape.layer_linear_params()
    if s.sharding == "zero3":  # bf16 parameters gathered ahead of use (stage3_max_live_parameters = 1e9)
        buffers += 2 * min(shape.params, 1e9) / n
    # Gradients are freed after every step (set_to_none) and appear in backward while activations are freed: only
    # DDP's buckets and ZeRO-3's partitions stay allocated across the peak.
    persistent = (s.sharding == "none" and s.gpus > 1) or s.sharding == "zero3"
    return {
        "weights": weights / GIB,
        "gradients": (gradients if persistent else max(0.0, gradients - activations - logits)) / GIB,
        "optimizer": optimizer / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "buffers": buffers / GIB,
    }


def peak_memory_gib(shape: Shape, s: Setup) -> float:
    return sum(memory_terms(shape, s).values())


def loss_traffic_seconds(shape: Shape, s: Setup, gpu: GPU) -> float:
    """Per processed token: the unfused loss's memory traffic (LOSS_TRAFFIC_BYTES per logit) at the GPU's datasheet
    bandwidth. Not FLOPs, so not in the recipe's MFU: it weighs most where the vocabulary is large against the body."""
    if s.fused_loss or s.liger or not gpu.memory_tb_s:
        return 0.0
    return shape.vocab * LOSS_TRAFFIC_BYTES / (gpu.memory_tb_s * 1e12)


def step_seconds(shape: Shape, s: Setup, gpu: GPU, eff: Efficiency) -> float:
    tokens = s.micro_batch * s.row_tokens()  # padding is computed too
    dense, full = shape.flops_per_token(0), shape.flops_per_token(s.attention_span())
    peak = gpu.bf16_tflops * 1e12
    attention = (full - dense) / (peak * eff.attention_mfu) if eff.attention_mfu else (full - dense) / (peak * eff.mfu)
    return tokens * (dense / (peak * eff.mfu) + attention + loss_traffic_seconds(shape, s, gpu)) + eff.overhead_s


def tokens_per_second_per_gpu(shape: Shape, s: Setup, gpu: GPU, speed: float = 1.0) -> float:
    """Real tokens per second per GPU: the step's FLOPs at the recipe's measured MFU (times `speed`: scaling over GPUs,
    recomputation), plus its per-step overhead."""
    return s.real_tokens_per_step() / step_seconds(shape, s, gpu, efficiency()[s.efficiency]) * speed


def _solve(columns: list[list[float]], target: list[float]) -> list[float]:
    """Least squares of sum_j a_j columns[j][i] = target[i], relative to each target (normal equations, 1-3 unknowns)."""
    k = len(columns)
    rows = [[columns[j][i] / target[i] for j in range(k)] for i in range(len(target))]
    ata = [[sum(r[a] * r[b] for r in rows) for b in range(k)] for a in range(k)]
    atb = [sum(r[a] for r in rows) for a in range(k)]
    for col in range(k):  # Gauss-Jordan
        pivot = ata[col][col]
        if abs(pivot) < 1e-30:
            raise ValueError("singular")
        for r in range(k):
            if r != col:
                f = ata[r][col] / pivot
                ata[r] = [x - f * y for x, y in zip(ata[r], ata[col])]
                atb[r] -= f * atb[col]
    return [atb[i] / ata[i][i] for i in range(k)]


def fit_efficiency(rows: list["Measured"]) -> dict[str, Efficiency]:
    """Each recipe's efficiency from its measured rows: seconds per real token = dense FLOPs x a (+ attention FLOPs x b
    where the rows span several lengths) (+ overhead / tokens per step where they span several models)."""
    out: dict[str, Efficiency] = {}
    groups: dict[str, list[Measured]] = {}
    for m in rows:
        groups.setdefault(m.setup.efficiency, []).append(m)
    for key, group in groups.items():
        peak = group[0].gpu.bf16_tflops * 1e12
        dense = [m.shape.flops_per_token(0) for m in group]
        full = [m.shape.flops_per_token(m.setup.attention_span()) for m in group]
        # seconds per processed token (padding included), less the loss's memory traffic (not FLOPs)
        seconds = [
            m.setup.real_tokens_per_step() / (m.tokens_per_s_per_gpu * m.setup.micro_batch * m.setup.row_tokens())
            - loss_traffic_seconds(m.shape, m.setup, m.gpu)
            for m in group
        ]
        lengths = {m.setup.seq_len for m in group}
        models = {m.shape.name for m in group}
        try:
            if len(lengths) > 2:
                a, b = _solve([dense, [f - d for f, d in zip(full, dense)]], seconds)
                if a > 0 and b > 0:
                    out[key] = Efficiency(1 / (a * peak), 1 / (b * peak), rows=len(group))
                    continue
            if len(models) > 1:
                inverse_tokens = [1 / (m.setup.micro_batch * m.setup.row_tokens()) for m in group]
                a, o = _solve([full, inverse_tokens], seconds)
                if a > 0 and o > 0:
                    out[key] = Efficiency(1 / (a * peak), overhead_s=o, rows=len(group))
                    continue
        except ValueError:
            pass
        (a,) = _solve([full], seconds)
        out[key] = Efficiency(1 / (a * peak), rows=len(group))
    return out


@cache
def efficiency() -> dict[str, Efficiency]:
    """The efficiencies fitted on CALIBRATION_FILES (read from the repository's results/)."""
    import json

    rows = []
    for name in CALIBRATION_FILES:
        path = Path(__file__).resolve().parents[2] / name  # the repository root
        rows += measured_rows(json.loads(path.read_text()), name)
    return fit_efficiency(rows)


def needed_gib(peak_gib: float) -> float:
    """The GPU memory a predicted peak needs: the margin and the CUDA context on top."""
    return peak_gib * FIT_MARGIN + CUDA_CONTEXT_GIB


def fits(peak_gib: float, gpu_memory_gib: float) -> bool:
    return needed_gib(peak_gib) <= gpu_memory_gib


# ---- --check: every row our harnesses write, as a Setup ----------------------------------------------------------


@dataclass
class Measured:
    label: str
    shape: Shape
    setup: Setup
    gpu: GPU
    peak_memory_gib: float
    tokens_per_s_per_gpu: float


def measured_rows(result: dict[str, Any], path: str = "") -> list[Measured]:
    """The rows of a results file written by scripts/benchmarks/{throughput,memory,sharded,attention}.py."""
    gpu = gpu_by_device_name(result.get("device", "")) or BY_KEY["h200"]
    rows = result.get("rows") or result.get("results") or []
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path} holds no rows of a results file this project's benchmarks write")
    if "settings" in result:  # memory.py
        return [_memory_row(result, r, gpu) for r in rows if "peak_memory_gib" in r and "tokens_per_second" in r]
    if "seq_lens" in result:  # attention.py
        return [_attention_row(result, r, gpu) for r in rows if r.get("status") == "ok"]
    if "per_gpu_batch" in result:  # sharded.py
        return [_sharded_row(result, r, gpu) for r in rows if "peak_memory_gib" in r]
    if "seq_len" in result and all("batches" in r for r in rows):  # throughput.py
        return [_throughput_row(result, r, gpu) for r in rows if "tokens_per_s_per_gpu" in r and "peak_allocated_gib" in r]
    raise UserError(f"{path} is not a results file of scripts/benchmarks/ (throughput, memory, sharded or attention)")


def _result_shape(result: dict[str, Any], model: str, vocab_size: int = 0) -> Shape:
    if model in PRESETS:
        return load_shape(model, vocab_size or int(result.get("vocab_size") or 0))
    config = result.get("model_config")
    if not config:
        return load_shape(model)
    from transformers import AutoConfig

    kept = {k: v for k, v in config.items() if k != "model_type" and v is not None}
    return shape_of(model, AutoConfig.for_model(config["model_type"], **kept))


def _throughput_row(result: dict[str, Any], r: dict[str, Any], gpu: GPU) -> Measured:
    seq_len, mb = int(result["seq_len"]), int(r["micro_batch"])
    launch = r.get("launch", "")
    sharding = "zero3" if launch.endswith("+deepspeed") else "fsdp2" if "fsdp" in launch else "none"
    method = r["adapter"] or {"galore_adamw": "galore", "adamw_bnb_8bit": "adam8bit"}.get(r["optim"], "full")
    batches = "padded" if r["batches"] == "padded" else "packed"
    per_row = MEAN_DOCUMENT if batches == "padded" else r.get("tokens_per_step", 0) / mb / r["gpus"] or seq_len
    setup = Setup(
        method=method,
        sharding=sharding,
        gpus=int(r["gpus"]),
        precision="bf16" if method == "qlora" and sharding == "fsdp2" else "mixed",
        micro_batch=mb,
        seq_len=seq_len,
        batches=batches,
        attention="mask" if r["batches"] == "packed" and r["attn"] == "sdpa" else "flash",
        liger=bool(r["liger"]),
        compiled=bool(r["compile"]),
        fp8=bool(r.get("fp8")),
        fused_loss=bool(r.get("fused_loss")),
        efficiency=r["case"],
        tokens_per_row=per_row,
        padded_len=LONGEST_DOCUMENT,
    )
    label = f"{result['model']}: {r['case']}"
    return Measured(label, _result_shape(result, result["model"]), setup, gpu, r["peak_allocated_gib"], r["tokens_per_s_per_gpu"])


MEMORY_CASES = {
    "full_adamw": "full",
    "full_adamw_8bit": "adam8bit",
    "galore_adamw": "galore",
    "galore_adamw_8bit_layerwise": "galore8_layerwise",
    "lora": "lora",
    "qlora": "qlora",
}


def _memory_row(result: dict[str, Any], r: dict[str, Any], gpu: GPU) -> Measured:
    settings = result["settings"]
    rank = int(dict(kv.split("=") for kv in settings["galore_args"].split(","))["rank"])
    setup = Setup(
        method=MEMORY_CASES[r["case"]],
        precision="bf16",
        micro_batch=int(settings["batch_size"]),
        seq_len=int(settings["seq_len"]),
        checkpointing="hf" if settings["activation_checkpointing"] else "",
        galore_rank=rank,
        efficiency=f"memory.py: {r['case']}",
        tokens_per_row=float(settings["seq_len"]),
    )
    label = f"{settings['model']}: memory {r['case']}"
    return Measured(label, load_shape(settings["model"]), setup, gpu, r["peak_memory_gib"], r["tokens_per_second"])


SHARDED_CASES = {  # case: (method, sharding, precision, checkpointing)
    "DDP": ("full", "none", "mixed", ""),
    "FSDP2": ("full", "fsdp2", "mixed", "fsdp"),
    "ZeRO-3": ("full", "zero3", "bf16", ""),
    "FSDP2 + LoRA": ("lora", "fsdp2", "mixed", "hf"),
    "FSDP2 + QLoRA": ("qlora", "fsdp2", "bf16", "hf"),
}


def _sharded_row(result: dict[str, Any], r: dict[str, Any], gpu: GPU) -> Measured:
    method, sharding, precision, checkpointing = SHARDED_CASES[r["case"]]
    mb = int(result["per_gpu_batch"])
    setup = Setup(
        method=method,
        sharding=sharding,
        gpus=int(result["gpus"]),
        precision=precision,
        micro_batch=mb,
        seq_len=2048,
        batches="padded",
        checkpointing=checkpointing,
        efficiency=r["script"],
        tokens_per_row=MEAN_DOCUMENT,
        padded_len=LONGEST_DOCUMENT,
    )
    label = f"{result['model']}: {r['case']} x{result['gpus']}"
    measured = r["train_tokens_per_second_per_device"]
    return Measured(label, load_shape(result["model"]), setup, gpu, r["peak_memory_gib"], measured)


def _attention_row(result: dict[str, Any], r: dict[str, Any], gpu: GPU) -> Measured:
    rows, seq_len = r["batch_shape"][0], r["seq_len"]
    free = r["case"].endswith("padding-free")
    kind = {"eager": "eager", "sdpa math": "math", "sdpa padding-free": "mask"}.get(r["case"], "flash")
    setup = Setup(
        precision="bf16",
        micro_batch=1 if free else rows,
        seq_len=seq_len,
        batches="packed" if free else "padded",
        attention=kind,
        optimizer_step=False,
        efficiency=f"attention.py: {r['case']}",
        tokens_per_row=r["real_tokens"] / (1 if free else rows),
        padded_len=seq_len,
    )
    label = f"{result['model']}: attention {r['case']} T={seq_len}"
    shape = load_shape(result["model"], int(result["arguments"]["vocab_size"]))
    return Measured(label, shape, setup, gpu, r["peak_memory_gib"], r["real_tokens_per_s"])


# ---- the plan: which example, with which flags, fits and how fast --------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One example script as a plan can run it: its setup, and the measured recipe its speed is taken from."""

    method: str
    script: str
    config: str  # accelerate config (1 GPU: none)
    flags: tuple[str, ...]
    setup: Setup
    efficiency: str  # key of efficiency()
    min_gpus: int = 1
    max_gpus: int = 1 << 30
    float8: bool = False  # needs float8 tensor cores
    speed: float = 1.0  # against the measured recipe (CHECKPOINT_SPEED where it adds checkpointing)
    measured_gpus: int = 1  # the efficiency already holds the scaling to this many GPUs


RECIPE = "FA2 padding-free + compiled layers + fused loss (big batch)"
RECIPE_FP8 = "FA2 padding-free + float8 + compiled layers + fused loss (big batch)"
PACKED = Setup(batches="packed", attention="flash")
BLOCKS = Setup(batches="padded", attention="flash")  # the Trainer scripts pad each batch; blocks of T are full rows


def sharded(method: str, script: str, config: str, setup: Setup) -> Example:
    """A script launched on 2 or more GPUs, its efficiency measured on 2 (the benchmark row named after it)."""
    return Example(method, script, config, (), setup, script, min_gpus=2, measured_gpus=2)


def checkpointed(example: Example) -> Example:
    """The same example with --activation_checkpointing: less activation memory, CHECKPOINT_SPEED of its speed."""
    setup = replace(example.setup, checkpointing="hf")
    return replace(example, flags=(*example.flags, "--activation_checkpointing"), setup=setup, speed=CHECKPOINT_SPEED)


FA2 = Example("full", "sdpa/flash_attention.py", "", ("--fused_loss",), replace(PACKED, fused_loss=True), "FA2 padding-free")
GALORE = Example(
    "galore", "trainer/galore.py", "", ("--optim", "galore_adamw"), replace(BLOCKS, method="galore"), "GaLore (FA2 padding-free)"
)
ADAM8BIT = Example(
    "adam8bit",
    "trainer/galore.py",
    "",
    ("--optim", "adamw_bnb_8bit"),
    replace(BLOCKS, method="adam8bit"),
    "8-bit AdamW (FA2 padding-free)",
)
EXAMPLES = [
    Example(
        "full",
        "sdpa/flash_attention.py",
        "",
        ("--compile_layers", "--fused_loss"),
        replace(PACKED, compiled=True, fused_loss=True),
        RECIPE,
    ),
    Example(
        "full",
        "sdpa/flash_attention.py",
        "",
        ("--compile_layers", "--fused_loss", "--fp8"),
        replace(PACKED, compiled=True, fused_loss=True, fp8=True),
        RECIPE_FP8,
        float8=True,
    ),
    checkpointed(FA2),
    sharded(
        "full", "trainer/sharded/fsdp.py", "accelerate_config_fsdp.yaml", replace(BLOCKS, sharding="fsdp2", checkpointing="fsdp")
    ),
    sharded(
        "full",
        "trainer/sharded/zero.py",
        "accelerate_config.yaml + deepspeed_config.json",
        replace(BLOCKS, sharding="zero3", precision="bf16"),
    ),
    sharded("full", "trainer/getting_started.py", "accelerate_config.yaml", BLOCKS),
    Example("lora", "lora/custom_loop.py", "", (), replace(BLOCKS, method="lora"), "LoRA (FA2 padding-free)", max_gpus=1),
    Example(
        "lora",
        "lora/custom_loop_accelerate.py",
        "accelerate_config.yaml",
        (),
        replace(BLOCKS, method="lora"),
        "LoRA (FA2 padding-free)",
        min_gpus=2,
    ),
    sharded(
        "lora",
        "trainer/sharded/fsdp_lora.py",
        "accelerate_config_fsdp_lora.yaml",
        replace(BLOCKS, method="lora", sharding="fsdp2", checkpointing="hf"),
    ),
    Example(
        "qlora", "trainer/qlora.py", "", (), replace(BLOCKS, method="qlora", checkpointing="hf"), "memory.py: qlora", max_gpus=1
    ),
    sharded(
        "qlora",
        "trainer/sharded/fsdp_qlora.py",
        "accelerate_config_fsdp_qlora.yaml",
        replace(BLOCKS, method="qlora", sharding="fsdp2", precision="bf16", checkpointing="hf"),
    ),
    GALORE,
    checkpointed(GALORE),
    Example(
        "galore",
        "trainer/galore.py",
        "",
        ("--optim", "galore_adamw_8bit_layerwise", "--activation_checkpointing"),
        replace(BLOCKS, method="galore8_layerwise", checkpointing="hf"),
        "memory.py: galore_adamw_8bit_layerwise",
        max_gpus=1,
    ),
    ADAM8BIT,
    checkpointed(ADAM8BIT),
]
MICRO_BATCHES = (32, 16, 8, 4, 2, 1)  # rows per GPU tried, largest first (the benchmarks measured 1-32)


@dataclass
class Option:
    example: Example
    micro_batch: int
    accumulation: int
    fits: bool
    memory: dict[str, float]
    tokens_per_s_per_gpu: float | None
    breaks: str = ""  # the largest term, where nothing fits

    @property
    def peak_memory_gib(self) -> float:
        return sum(self.memory.values())


def plan(
    shape: Shape, method: str, gpus_per_node: int, nodes: int, gpu: GPU, seq_len: int, global_batch_tokens: int
) -> list[Option]:
    """Every example of `method` that can run on this many GPUs, with the largest micro-batch that fits, ranked:
    what fits first, fastest first."""
    gpus = gpus_per_node * nodes
    rows_per_step = max(1, global_batch_tokens // seq_len)
    out = []
    for ex in EXAMPLES:
        if ex.method != method or not ex.min_gpus <= gpus <= ex.max_gpus or (ex.float8 and not gpu.float8):
            continue
        base = replace(ex.setup, gpus=gpus, gpus_per_node=gpus_per_node, seq_len=seq_len, efficiency=ex.efficiency)
        chosen = None
        for mb in MICRO_BATCHES:
            if mb * gpus > rows_per_step and mb > 1:
                continue
            memory = memory_terms(shape, replace(base, micro_batch=mb))
            if fits(sum(memory.values()), gpu.memory_gib):
                chosen = (mb, memory)
                break
        mb, memory = chosen or (1, memory_terms(shape, replace(base, micro_batch=1)))
        setup = replace(base, micro_batch=mb)
        speed = ex.speed
        if gpus > ex.measured_gpus:
            speed *= scaling(setup.sharding, gpus, gpus_per_node) / scaling(setup.sharding, ex.measured_gpus, gpus_per_node)
        tps = tokens_per_second_per_gpu(shape, setup, gpu, speed) if gpu.bf16_tflops else None
        breaks = "" if chosen else max(memory, key=lambda k: memory[k])
        out.append(Option(ex, mb, math.ceil(rows_per_step / (mb * gpus)), chosen is not None, memory, tps, breaks))
    return sorted(out, key=lambda o: (not o.fits, -(o.tokens_per_s_per_gpu or 0)))


def launch_command(option: Option, model: str, seq_len: int, gpus_per_node: int, nodes: int) -> str:
    ex = option.example
    script = f"scripts/{ex.script}"
    flags = [*ex.flags, "--per_device_train_batch_size", str(option.micro_batch)]
    flags += ["--gradient_accumulation_steps", str(option.accumulation)] if option.accumulation > 1 else []
    if ex.script == "sdpa/flash_attention.py":
        flags = ["--pack_rows", str(seq_len), *flags]
    own = f"{script} --model {model} --data_dir data/<yours> {' '.join(flags)}"
    if gpus_per_node * nodes == 1:
        return f"CUDA_VISIBLE_DEVICES=0 python {own}"
    config = ex.config.split(" + ")[0]
    machines = (
        f" --num_machines {nodes} --machine_rank <0..{nodes - 1}> --main_process_ip <machine 0> --main_process_port 29500"
        if nodes > 1
        else ""
    )
    return f"accelerate launch --config_file {config}{machines} --num_processes {gpus_per_node * nodes} {own}"
