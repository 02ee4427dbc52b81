"""Where the main job's time goes after its imports: data preparation, 100 training steps and one evaluation of the embedded task, with
the main job's settings (tiny preset, batch 32, eval batch 64), in CPU seconds of one thread (CPU time moves less
than wall time on a busy machine; one thread, so that no second one spins while waiting).

    OMP_NUM_THREADS=1 PYTHONPATH=scripts python results/quickstart/phases.py   # after the main job made data/synthetic
"""

import hftrain.quiet  # noqa: F401  (first, as in the scripts)

import os
import resource
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments, set_seed

from hftrain.data import PadCollator, PrepareArguments, load_prepared, prepare
from hftrain.metrics import Accuracy
from hftrain.models import load_model


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


with tempfile.TemporaryDirectory() as folder:
    c, w = cpu(), time.perf_counter()
    prepare(PrepareArguments(output_dir=f"{folder}/synthetic"))
    print(f"data preparation (the embedded task): {cpu() - c:.2f} s CPU, {time.perf_counter() - w:.2f} s wall", flush=True)
data = load_prepared("data/synthetic")
set_seed(0)
accuracy = Accuracy(data.answer_token_ids)
args = TrainingArguments(
    output_dir="output/quickstart-phases",
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=3e-3,
    max_steps=100,
    logging_steps=10,
    save_strategy="no",
    eval_strategy="no",
    report_to=[],
    disable_tqdm=True,
    include_num_input_tokens_seen="non_padding",
)
trainer = Trainer(
    model=load_model("tiny", data.tokenizer),
    args=args,
    train_dataset=data.train,
    eval_dataset=data.test,
    data_collator=PadCollator(data.tokenizer),
    processing_class=data.tokenizer,
    compute_metrics=accuracy.compute_metrics,
    preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
)
for label, phase in (("train 100 steps", trainer.train), ("one evaluation (600 examples)", trainer.evaluate)):
    c, w = cpu(), time.perf_counter()
    phase()
    print(
        f"{label}: {cpu() - c:.2f} s CPU, {time.perf_counter() - w:.2f} s wall, {torch.get_num_threads()} thread(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
