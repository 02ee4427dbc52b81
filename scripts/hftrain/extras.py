"""The optional packages: which extra of pyproject.toml installs each, and the check a script runs before
any work when a technique it was asked for needs one.

`pip install -e .` installs what the plain examples need; `pip install -e ".[quant]"` (or `.[all]`) adds
the rest. No module of `hftrain` imports an optional package at module level, so the core install runs.
"""

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from hftrain.errors import UserError

# import name -> (the name pip installs it by, the extra of pyproject.toml that brings it)
EXTRAS = {
    "bitsandbytes": ("bitsandbytes", "quant"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "galore_torch": ("galore-torch", "galore"),
    "liger_kernel": ("liger-kernel", "liger"),
    "torchao": ("torchao", "fp8"),
}


def require_extra(module: str, flag: str | None = None) -> None:
    """Stop with one sentence when `module` is not installed: the script (and the flag) that needs it and the
    extra that installs it, e.g. `error: qlora.py needs bitsandbytes: pip install -e ".[quant]"`."""
    if importlib.util.find_spec(module) is None:
        package, extra = EXTRAS[module]
        who = Path(sys.argv[0]).name + (f" with {flag}" if flag else "")
        raise UserError(f'{who} needs {package}: pip install -e ".[{extra}]"')


def optimizer_packages(optim: str) -> list[str]:
    """The optional packages that the Trainer's `--optim <name>` imports (transformers' trainer_optimizer.py)."""
    if optim.startswith("galore"):  # galore-torch's 8-bit AdamW is bitsandbytes' 8-bit Adam underneath
        return ["galore_torch", "bitsandbytes"] if "8bit" in optim else ["galore_torch"]
    if optim in ("adamw_torch_4bit", "adamw_torch_8bit"):
        return ["torchao"]
    if optim.startswith(("adamw_bnb", "adamw_8bit", "paged_", "lion", "ademamix", "rmsprop_bnb")):
        return ["bitsandbytes"]
    return []


def check_training_extras(training_args: Any) -> None:
    """The optional packages that the Trainer's arguments ask for: --deepspeed (or a DeepSpeed accelerate config),
    --use_liger_kernel, an 8-bit, paged or GaLore --optim. `training_args` may be the parser's namespace: the check
    runs before TrainingArguments is built, which already imports deepspeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        require_extra("deepspeed", "a DeepSpeed accelerate config")
    if training_args.deepspeed:
        require_extra("deepspeed", f"--deepspeed {training_args.deepspeed}")
    if training_args.use_liger_kernel:
        require_extra("liger_kernel", "--use_liger_kernel")
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    for module in optimizer_packages(optim):
        require_extra(module, f"--optim {optim}")
