"""Getting started with the Trainer: train a causal language model, evaluate it, save it.

Teaches the smallest complete Trainer setup: prepared data, a model, `TrainingArguments`,
`Trainer`, then train, evaluate and save. With no arguments it trains the `tiny` preset on
the embedded rating task (data prepared on first use) in about a minute on a laptop CPU.

    python scripts/trainer/getting_started.py                     # CPU, or every GPU (DataParallel)
    accelerate launch --config_file accelerate_config.yaml \\
        scripts/trainer/getting_started.py --model small          # every GPU, one process each (DDP)
    python scripts/trainer/getting_started.py --help              # every flag, TrainingArguments' too
    python scripts/trainer/getting_started.py --model path/to/checkpoint --dataset corpus.txt \
        --eval_on_start                                           # your model and text: perplexity before and after
    python scripts/trainer/getting_started.py --model path/to/checkpoint --dataset big.jsonl \
        --streaming --max_steps 10000                             # a corpus larger than memory, read as it trains

SIGTERM (a scheduler's preemption notice) or Ctrl-C saves a checkpoint after the current step and
exits with status 143 or 130; the same command plus `--resume_from_checkpoint latest` continues
exactly where it stopped.

Plain `python` on a machine with several GPUs makes the Trainer wrap the model in
`torch.nn.DataParallel` (one process, batch split across GPUs); DDP through `accelerate
launch` (or `torchrun`) is faster and is what to use in practice.

Docs: https://huggingface.co/docs/transformers/main_classes/trainer
      https://huggingface.co/docs/transformers/training
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import torch
from transformers import Trainer, set_seed

from hftrain.cli import ScriptArguments
from hftrain.data import PadCollator
from hftrain.metrics import Accuracy
from hftrain.models import load_model
from hftrain.trainer import check_trainer, load_data, parse_args, run_callbacks, write_run_summary


def main() -> None:
    # TrainingArguments from the command line, over the project's defaults (hftrain.trainer.DEFAULTS: 3 epochs, batches
    # of 32, lr 3e-3, evaluation and a checkpoint each epoch, bf16 on CUDA, TensorBoard); a pretrained --model is
    # fine-tuned with a lower learning rate (printed). Every flag is checked before anything is loaded or written.
    args, training_args, checkpoint = parse_args(ScriptArguments, output_dir="output/trainer/getting_started")
    # The prepared data (--dataset: prepared for --model first; --streaming: read as it trains), with its tokenizer.
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)

    accuracy = Accuracy(data.answer_token_ids)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.test,
        data_collator=PadCollator(data.tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        processing_class=data.tokenizer,  # saved beside the model
        compute_metrics=accuracy.compute_metrics,
        preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
        # tokens/s; SIGTERM or Ctrl-C: save a checkpoint, then exit; --streaming: the stream's position in each checkpoint
        callbacks=run_callbacks(data),
    )
    check_trainer(trainer, data)  # e.g. the data's longest example must fit the model's positions
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()  # safetensors weights, config and tokenizer, from the main process only
    # metrics.json, the PNG and the model card (README.md); --push_to_hub: the folder uploaded. Then every process
    # leaves the process group (DDP) before exiting.
    write_run_summary(trainer, data, train_result, eval_metrics)


if __name__ == "__main__":
    main()
