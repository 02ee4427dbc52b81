"""Loading a checkpoint runs the checkpoint's model code and nothing fetched from elsewhere."""

from hftrain.data import load_prepared
from hftrain.models import load_model


def test_checkpoint_loads_without_hub_kernels(workdir, start_checkpoint):
    """transformers 5.25 kernelizes by default: layers swapped at load time for kernels downloaded from the Hub,
    which fails on an offline GPU machine (seen on an H200) and runs code no flag asked for."""
    tokenizer = load_prepared(str(workdir / "data/synthetic")).tokenizer
    model = load_model(start_checkpoint, tokenizer)
    assert model.use_kernels is False
