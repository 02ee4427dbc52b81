"""Outputs that can be shared: an adapter that names its base portably, and a model card in every output folder.

- `shareable_base`: a base model as a Hub id, a preset's name, or a local folder as a path relative to
  the output folder (never this machine's absolute path, which means nothing elsewhere).
- `relocate_adapter_base`: rewrites a saved adapter's `base_model_name_or_path` that way. PEFT resolves
  that field against the current directory, so loading goes through `adapter_base`, which resolves a
  relative path against the adapter's own folder.
- `write_model_card`: README.md with the Hub's card metadata (base_model, datasets, library_name) and
  what a reader needs: base model, data, steps, final metrics (perplexity before and after training).

Docs: https://huggingface.co/docs/hub/model-cards  https://huggingface.co/docs/huggingface_hub/guides/model-cards
"""

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

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


def write_model_card(output_dir: str, metrics: dict[str, Any]) -> Path:
    """README.md for the model or adapter in `output_dir`, from the run's metrics (base_model, dataset, steps, ...)."""
    out = Path(output_dir)
    adapter = relocate_adapter_base(output_dir)
    base = adapter if adapter is not None else metrics.get("base_model", "")
    preset = base in PRESETS or (adapter is not None and (out / base / "config.json").exists() and base == "base")
    hub_base = base if base and not preset and not is_local_path(base) else None
    method = metrics.get("method")  # a TRL run: "DPO (TRL DPOTrainer)", "reward model (TRL RewardTrainer)", ...
    classifier = metrics.get("model_kind") == "sequence classifier"  # a reward model: one score per text
    data = ModelCardData(
        library_name="peft" if adapter is not None else "transformers",
        base_model=hub_base,
        datasets=[metrics["dataset"]] if metrics.get("dataset") and not Path(metrics["dataset"]).suffix else None,
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=(["lora"] if adapter is not None else []) + (["trl", method.split()[0].lower()] if method else []) or None,
    )
    origin = (
        f"a `{metrics.get('base_model')}` preset with random weights (saved in `{base}/`)"
        if preset and adapter is not None
        else f"a `{base}` preset with random weights, trained from scratch"
        if preset
        else f"[{base}](https://huggingface.co/{base})"
        if hub_base
        else f"the local checkpoint `{Path(base).name}` (at `{base}`, relative to this folder)"
    )
    rows = [
        ("eval loss (nats per token)", "eval_loss_before", "eval_loss"),
        ("perplexity", "perplexity_before", "perplexity"),
        ("eval accuracy" + (" (next token)" if metrics.get("task") == "text" else ""), "eval_accuracy_before", "eval_accuracy"),
    ]
    if method:  # the held-out greedy answers (rating task), then the trainer's own held-out metrics
        rows = [("eval accuracy (greedy answers)", "eval_accuracy_before", "eval_accuracy")]
        rows += [(key, "", key) for key in metrics.get("card_metrics", [])]
    table = "\n".join(
        f"| {name} | {_fmt(metrics.get(before))} | {_fmt(metrics.get(after))} |"
        for name, before, after in rows
        if after in metrics
    )
    auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    load = (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")  # a Hub id, or a path relative to this folder\n'
        f'model = PeftModel.from_pretrained(base, "{out.name}")'
        if adapter is not None
        else f'from transformers import {auto}\nmodel = {auto}.from_pretrained("{out.name}")'
    )
    content = f"""---
{data.to_yaml()}
---

# {out.name}

{"A LoRA adapter" if adapter is not None else "A reward model" if classifier else "A causal language model"} trained \
{f"with {method} " if method else ""}from {origin} on
`{metrics.get("dataset", "?")}` ({metrics.get("task", "?")} data) for {metrics.get("steps", "?")} optimizer steps.

| metric (held-out split) | before training | after training |
|---|---|---|
{table}

Training loss at the end: {_fmt(metrics.get("train_loss"))}. Throughput: {_fmt(metrics.get("train_tokens_per_second"))} tokens/s
on {metrics.get("num_devices", "?")} x {metrics.get("device", "?")}. Every number is in `metrics.json` beside this card.

```python
{load}
```
"""
    path = out / "README.md"
    ModelCard(content).save(path)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.4g}" if isinstance(value, float) else str(value)
