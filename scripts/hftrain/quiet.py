"""Imported first by every script: drops the libraries' start-up lines that a user can neither act on nor judge.

Each is dropped at its own logger (or warning category) by its exact text, nothing else from that library:
- torchao: "Failed to load .../torchao/_C_*.so": its wheel ships kernels built for CUDA and for other Python
  versions; on this machine they are not used (float8 training needs a CUDA GPU, and checks for it itself).
- torch: "<enum ...> is an Enum subclass ... register_constant() ... deprecated": torchao registers its enums the
  old way at import; nothing a user can change.
- DeepSpeed: "Setting accelerator to CPU": printed when anything imports deepspeed on a machine without a GPU,
  also in scripts that never use it.
- bitsandbytes (and the kernels package under it): "Failed to load CPU gemm_4bit_forward from kernels-community" and
  "Skipping publisher trust check": an optional faster CPU kernel from the Hub; the built-in one is used instead.
- transformers: "`is_gradient_checkpointing` is deprecated": PEFT reads the old property when it wraps a model.
"""

import logging
import warnings


class _DropLines(logging.Filter):
    def __init__(self, *starts: str, containing: str = "") -> None:
        super().__init__()
        self.starts, self.containing = starts, containing

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith(self.starts) and self.containing in text)


logging.getLogger("torchao").addFilter(_DropLines("Failed to load ", containing="torchao/_C"))
logging.getLogger("torch.utils._pytree").addFilter(_DropLines("%s is an Enum subclass and is now natively supported"))
logging.getLogger("DeepSpeed").addFilter(_DropLines("Setting accelerator to CPU."))
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropLines("Failed to load CPU gemm_4bit_forward from kernels"))
logging.getLogger("kernels._internals.hf_hub").addFilter(_DropLines("Skipping publisher trust check"))
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
