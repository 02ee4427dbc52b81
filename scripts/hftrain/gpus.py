"""The GPUs the project knows, in one table: dense bf16 peak, memory, its bandwidth, float8 tensor cores, and sources.

`reporting.peak_flops` (MFU) reads the peaks from here by device name; `scripts/plan.py` reads it by key (`--gpu h200`).
Peaks are the vendor datasheets' dense bf16 tensor-core figures (no sparsity); bandwidths are the same datasheets'
memory bandwidth (TB/s, 10^12 bytes per second). Memory is what `torch.cuda` /
`nvidia-smi` report as the card's total (an "80 GB" H100 shows 79.6 GiB), not the marketing figure.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    key: str  # what --gpu takes
    device_name: str  # matched against torch.cuda.get_device_name(), first hit in GPUS' order wins
    bf16_tflops: float  # dense bf16 tensor-core peak
    memory_gib: float
    float8: bool  # float8 tensor cores (compute capability 8.9+): --fp8
    source: str
    memory_tb_s: float = 0.0  # datasheet memory bandwidth, TB/s (0: unknown)


H100_DATASHEET = "https://www.nvidia.com/en-us/data-center/h100/ (SXM: 1,979 TFLOPS bf16 with sparsity, 989 dense, 3.35 TB/s)"
A100_DATASHEET = "https://www.nvidia.com/en-us/data-center/a100/ (312 TFLOPS bf16 dense; 80 GB SXM 2,039 GB/s, 40 GB 1,555 GB/s)"
# Where each row's figures come from, by key.
SOURCES = {
    "h100-pcie": H100_DATASHEET + "; PCIe: 756 dense, 2 TB/s",
    "h100-nvl": H100_DATASHEET + "; NVL: 835 dense, 94 GB, 3.9 TB/s",
    "gh200": "https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/ (H100 SXM compute; 96 GB HBM3, 4 TB/s)",
    "h100": H100_DATASHEET + "; 80 GB = 81,559 MiB in nvidia-smi",
    "h200": "https://www.nvidia.com/en-us/data-center/h200/ (989 dense bf16, 141 GB, 4.8 TB/s; 143,771 MiB in nvidia-smi)",
    "b200": "https://www.nvidia.com/en-us/data-center/dgx-b200/ (2.25 PFLOPS dense bf16 per GPU; 64 TB/s over 8 GPUs)",
    "a100-80": A100_DATASHEET + "; 80 GB = 81,920 MiB",
    "a100-40": A100_DATASHEET + "; 40 GB = 40,960 MiB",
    "l40s": "https://www.nvidia.com/en-us/data-center/l40s/ (362 TFLOPS bf16 dense, 48 GB, 864 GB/s)",
    "l4": "https://www.nvidia.com/en-us/data-center/l4/ (121 TFLOPS bf16 dense, 24 GB, 300 GB/s)",
    "a10": "https://www.nvidia.com/en-us/data-center/products/a10-gpu/ (125 TFLOPS bf16, 24 GB, 600 GB/s)",
    "4090": "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: 165.2 TFLOPS bf16 dense (fp32 accumulate), 24 GB, 1,008 GB/s",
    "3090": "NVIDIA Ampere GA102 whitepaper, RTX 3090: 71 TFLOPS bf16 dense, 24 GB, 936 GB/s",
}
# More specific names first: "H100 PCIe" must match before "H100", "GH200" before "H200"'s substring checks.
TABLE = """
key       | device name    | dense bf16 TFLOPS | memory GiB | float8 | memory TB/s
h100-pcie | H100 PCIe      | 756               | 79.6       | yes    | 2.0
h100-nvl  | H100 NVL       | 835               | 93.1       | yes    | 3.9
gh200     | GH200          | 989               | 94.5       | yes    | 4.0
h100      | H100           | 989               | 79.6       | yes    | 3.35
h200      | H200           | 989               | 139.8      | yes    | 4.8
b200      | B200           | 2250              | 178.4      | yes    | 8.0
a100-80   | A100-SXM4-80GB | 312               | 79.2       | no     | 2.039
a100-40   | A100           | 312               | 39.4       | no     | 1.555
l40s      | L40S           | 362               | 44.4       | yes    | 0.864
l4        | L4             | 121               | 22.0       | yes    | 0.3
a10       | A10            | 125               | 22.1       | no     | 0.6
4090      | RTX 4090       | 165               | 23.6       | yes    | 1.008
3090      | RTX 3090       | 71                | 23.6       | no     | 0.936
"""


def _row(line: str) -> GPU:
    key, name, tflops, gib, float8, tb_s = (cell.strip() for cell in line.split("|"))
    return GPU(key, name, float(tflops), float(gib), float8 == "yes", SOURCES[key], float(tb_s))


GPUS = [_row(line) for line in TABLE.strip().splitlines()[1:]]
BY_KEY = {g.key: g for g in GPUS}


def gpu_by_device_name(device_name: str) -> GPU | None:
    return next((g for g in GPUS if g.device_name in device_name), None)
