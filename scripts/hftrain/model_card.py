"""The model card in every output folder: README.md with the Hub's card metadata (base_model, datasets,
library_name) and what a reader needs: base model, data, steps, final metrics (perplexity before and after
training), and how to load it.

Docs: https://huggingface.co/docs/hub/model-cards  https://huggingface.co/docs/huggingface_hub/guides/model-cards
"""

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hftrain.models import PRESETS, is_local_path
from hftrain.sharing import relocate_adapter_base


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
