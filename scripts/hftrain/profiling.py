"""Where a training step's time goes: torch.profiler over a few steps, every GPU kernel in one bucket.

`ProfileSteps` (a TrainerCallback) profiles the steps after a given one and `breakdown` reads the
profiler's Chrome trace: each kernel is traced back to the CPU operations that launched it (by its
correlation id) and put in a bucket by the kernel's name and those operations' names and input shapes.
The output layer is told from the decoder's matmuls by its vocabulary-sized dimension. Beside the
buckets: the GPU's idle time within the steps (the host is late: data loading, Python, launches,
synchronisations), the host's synchronisations (`.item()` and friends) and time spent loading data.
"""

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hftrain.reporting import synchronize

ATTENTION = "attention"
MATMUL = "matmuls (decoder)"
OUTPUT = "output layer + loss"
OPTIMIZER = "optimizer + grad clipping"
EMBEDDING = "embedding"
COPIES = "copies, casts, fills"
OTHER = "norms, activations, residuals, other"
BUCKETS = (MATMUL, ATTENTION, OUTPUT, EMBEDDING, OPTIMIZER, COPIES, OTHER)

_ATTN_KERNEL = ("flash", "fmha", "attention", "attn", "sdpa", "flex")
_ATTN_OP = ("scaled_dot_product", "flash_attn", "flex_attention", "varlen")
_GEMM_KERNEL = ("gemm", "xmma", "nvjet", "cutlass", "wgmma", "splitk", "cublas")
_GEMM_OP = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::matmul", "aten::linear")
_LOSS_OP = ("crossentropy", "cross_entropy", "nll_loss", "log_softmax")
_COPY = ("memcpy", "memset", "copy", "fill", "cast")
_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _has_dim(dims: Any, size: int) -> bool:
    return any(_has_dim(d, size) for d in dims) if isinstance(dims, list) else dims == size


def classify(kernel: str, ops: list[tuple[str, Any]], vocab_size: int) -> str:
    """The bucket of one GPU kernel, from its name and the CPU ops it ran under (outermost first,
    each (name, input dims))."""
    k, names = kernel.lower(), [n.lower() for n, _ in ops]
    if any(n.startswith("optimizer.") or "_fused_adam" in n or "_foreach_" in n for n in names):
        return OPTIMIZER
    if any("embedding" in n for n in names):
        return EMBEDDING
    if any(s in k for s in _ATTN_KERNEL) or any(s in n for n in names for s in _ATTN_OP):
        return ATTENTION
    if vocab_size and any(_has_dim(d, vocab_size) for _, d in ops) or any(s in n for n in names for s in _LOSS_OP):
        return OUTPUT
    if any(s in k for s in _GEMM_KERNEL) or (names and names[-1] in _GEMM_OP):
        return MATMUL
    if any(s in k for s in _COPY) or (names and names[-1] in ("aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_")):
        return COPIES
    return OTHER


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def breakdown(trace: dict[str, Any], steps: int, wall_s: float, vocab_size: int) -> dict[str, Any]:
    """Per-step milliseconds by bucket from a Chrome trace (`prof.export_chrome_trace`) of `steps` steps."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    ops_by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    launch_at: dict[Any, tuple[Any, float]] = {}
    syncs, sync_us, local_scalar, data_us = 0, 0.0, 0, 0.0
    for e in events:
        cat = e.get("cat", "")
        if cat in ("cpu_op", "user_annotation"):
            ops_by_thread[e["tid"]].append(e)
            if e["name"] == "aten::_local_scalar_dense":
                local_scalar += 1
            if e["name"].startswith("enumerate(DataLoader)"):
                data_us += e["dur"]
        elif cat in ("cuda_runtime", "cuda_driver"):
            launch_at[e.get("args", {}).get("correlation")] = (e["tid"], e["ts"])
            if e["name"].startswith(_SYNC):
                syncs, sync_us = syncs + 1, sync_us + e["dur"]
    launches: dict[Any, list[tuple[float, Any]]] = defaultdict(list)
    for corr, (tid, ts) in launch_at.items():
        launches[tid].append((ts, corr))
    stacks: dict[Any, list[tuple[str, Any]]] = {}  # correlation id -> the CPU ops (outermost first) open when the launch happened
    for tid, todo in launches.items():
        ops = sorted(ops_by_thread.get(tid, []), key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict[str, Any]] = []
        i = 0
        for ts, corr in sorted(todo, key=lambda x: x[0]):
            while i < len(ops) and ops[i]["ts"] <= ts:  # one sweep over the thread's ops, which nest
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < ops[i]["ts"]:
                    stack.pop()
                stack.append(ops[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
                stack.pop()
            stacks[corr] = [(e["name"], e.get("args", {}).get("Input Dims")) for e in stack if e["ts"] + e["dur"] >= ts]
    gpu_us: dict[str, float] = defaultdict(float)
    kernel_us: dict[str, float] = defaultdict(float)
    intervals = []
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        launched_under = stacks.get(e.get("args", {}).get("correlation"), [])
        gpu_us[classify(e["name"], launched_under, vocab_size)] += e["dur"]
        kernel_us[e["name"]] += e["dur"]
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    busy_ms = _busy(intervals) / 1e3 / steps
    step_ms = wall_s * 1e3 / steps
    top = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:8]
    return {
        "steps": steps,
        "step_ms": round(step_ms, 2),
        "gpu_ms": {b: round(gpu_us.get(b, 0.0) / 1e3 / steps, 2) for b in BUCKETS},
        "gpu_busy_ms": round(busy_ms, 2),
        "gpu_idle_ms": round(max(step_ms - busy_ms, 0.0), 2),  # the GPU waits for the host
        "host_syncs": round((syncs + local_scalar) / steps, 1),  # runtime syncs and .item()-style reads per step
        "sync_wait_ms": round(sync_us / 1e3 / steps, 2),
        "data_loading_ms": round(data_us / 1e3 / steps, 2),
        "top_kernels_ms": {name[:100]: round(us / 1e3 / steps, 2) for name, us in top},
    }


def compile_counters() -> dict[str, Any]:
    """Graph breaks and compiled graphs so far in this process (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": {k[:160]: v for k, v in sorted(breaks.items(), key=lambda kv: -kv[1])[:3]},
        "compiled_graphs": counters["stats"].get("unique_graphs", 0),
    }


class ProfileSteps(TrainerCallback):
    """Profile the `steps` optimizer steps after step `after` (CPU and CUDA, input shapes recorded);
    `self.result` then holds `breakdown`'s numbers."""

    def __init__(self, after: int, steps: int, vocab_size: int) -> None:
        self.after, self.steps, self.vocab_size = after, steps, vocab_size
        self.prof: Any = None
        self.t0 = 0.0
        self.result: dict[str, Any] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.after:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            synchronize()
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and state.global_step == self.after + self.steps:
            synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp, "trace.json")
                self.prof.export_chrome_trace(str(path))
                trace = json.loads(path.read_text())
            self.prof = None
            self.result = breakdown(trace, self.steps, wall, self.vocab_size)
