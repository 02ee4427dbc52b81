"""Outputs that can be shared: an adapter that names its base portably.

- `shareable_base`: a base model as a Hub id, a preset's name, or a local folder as a path relative to
  the output folder (never this machine's absolute path, which means nothing elsewhere).
- `relocate_adapter_base`: rewrites a saved adapter's `base_model_name_or_path` that way. PEFT resolves
  that field against the current directory, so loading goes through `adapter_base`, which resolves a
  relative path against the adapter's own folder.

The model card (README.md) that names the base this way is written by `hftrain.model_card`.
"""

import json
import os
from pathlib import Path

from hftrain.errors import UserError
from hftrain.models import PRESETS, is_local_path


def shareable_base(base: str, output_dir: str) -> str:
    if base in PRESETS or not is_local_path(base):
        return base
    return os.path.relpath(Path(base).expanduser().resolve(), Path(output_dir).resolve())


def relocate_adapter_base(output_dir: str) -> str | None:
    """Make the adapter in `output_dir` name its base relative to itself; returns the base it names (None: no adapter)."""
    path = Path(output_dir, "adapter_config.json")
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    base = config.get("base_model_name_or_path") or ""
    if os.path.isabs(base):
        config["base_model_name_or_path"] = base = shareable_base(base, output_dir)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return base


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter names, as a path `from_pretrained` loads from here: a path relative to the adapter's
    folder is resolved against it (an absolute one, as older adapters have, stays as it is), a Hub id is returned as it is."""
    base = json.loads(Path(adapter_dir, "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path)")
    if os.path.isabs(base) or base.startswith((".", "~")) or Path(adapter_dir, base).exists():
        path = (Path(adapter_dir) / Path(base).expanduser()).resolve()
        if not path.is_dir():
            raise UserError(
                f"the adapter's base model {base} does not exist (looked at {path}); put the base model there, "
                "or edit base_model_name_or_path in its adapter_config.json"
            )
        return str(path)
    return base  # a Hub id
