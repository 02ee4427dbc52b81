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
from huggingface_hub import upload_folder
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hftrain.checkpoints import check_same_model, resolve_checkpoint
from hftrain.cli import ScriptArguments, check_batch_size, check_output_dir, check_training_args, set_model_defaults
from hftrain.data import PadCollator, load_prepared
from hftrain.errors import UserError
from hftrain.extras import check_training_extras
from hftrain.metrics import Accuracy
from hftrain.models import PRESETS, check_max_length, load_model
from hftrain.preemption import PreemptionCallback
from hftrain.reporting import ThroughputCallback, write_results
from hftrain.streaming import check_streaming_args, load_streamed, stream_callbacks, stream_training_args


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    # The project's defaults; every one can be changed from the command line.
    parser.set_defaults(
        output_dir="output/trainer/getting_started",
        num_train_epochs=3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        warmup_steps=30,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        logging_steps=10,
        bf16=torch.cuda.is_available(),  # float32 on CPU, bf16 mixed precision on CUDA
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=["tensorboard"],
    )
    known = parser.parse_known_args()[0]
    check_training_extras(known)  # e.g. --deepspeed without deepspeed: which extra to install
    # A pretrained checkpoint is fine-tuned with a lower learning rate than a preset's random weights (printed).
    set_model_defaults(parser, known.model)
    args, training_args = parser.parse_args_into_dataclasses()
    if training_args.push_to_hub and args.model in PRESETS:
        raise UserError(f"--push_to_hub shares a fine-tuned model, but --model {args.model} is a preset with random weights")
    training_args.include_num_input_tokens_seen = "non_padding"  # tokens/s counts real tokens, not padding
    check_training_args(training_args)  # e.g. a batch size or step count of 0, more processes than GPUs
    check_streaming_args(args, training_args.max_steps, training_args.dataloader_num_workers)  # e.g. without --max_steps
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(  # and take its run lock: a second run on the same folder stops
        training_args.output_dir, args.overwrite_output_dir, checkpoint is not None, training_args.process_index == 0, args
    )
    if checkpoint and training_args.process_index == 0:
        print(f"resuming from {checkpoint}")

    if args.streaming:  # --dataset read, tokenized and cut into blocks as training goes, from the checkpoint's position
        stream_training_args(training_args)  # each process reads its part of every batch; no replay on resume
        per_step = training_args.train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
        data = load_streamed(args, per_step, training_args.seed, checkpoint)
    else:
        with training_args.main_process_first():  # each machine's main process prepares the data; the others then load it
            # --dataset: prepared for --model first
            data = load_prepared(args.data_dir, args.dataset, args.model, args.trust_remote_code)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)
    check_max_length(model, data.max_length)  # the data's longest example must fit the model's positions
    check_same_model(checkpoint, model)  # a checkpoint saved from another --model: one sentence, not a size mismatch
    if not args.streaming:  # a stream has no length
        check_batch_size(training_args.per_device_train_batch_size, training_args.world_size, len(data.train))

    accuracy = Accuracy(data.answer_token_ids)
    throughput = ThroughputCallback(seq_len=data.max_length)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.test,
        data_collator=PadCollator(data.tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        processing_class=data.tokenizer,  # saved beside the model
        compute_metrics=accuracy.compute_metrics,
        preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
        # SIGTERM or Ctrl-C: save a checkpoint, then exit; --streaming: the stream's position saved in each checkpoint
        callbacks=[throughput, PreemptionCallback(), *stream_callbacks(data)],
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()  # safetensors weights, config and tokenizer, from the main process only

    if trainer.is_world_process_zero():
        write_results(
            training_args.output_dir,
            {
                "eval_accuracy": eval_metrics["eval_accuracy"],
                "eval_loss": eval_metrics["eval_loss"],
                "train_loss": train_result.training_loss,
                "steps": trainer.state.global_step,
                "distributed_type": trainer.accelerator.distributed_type.value,  # MULTI_GPU (DDP), MULTI_CPU, or NO
                "base_model": args.model,  # these three go into the model card (README.md) too
                "dataset": data.source,
                "task": data.task,
                **throughput.metrics,
            },
            trainer.state.log_history,
        )
        if training_args.push_to_hub:  # the folder with its card; the Trainer created the repository at start
            upload_folder(repo_id=trainer.hub_model_id, folder_path=training_args.output_dir, ignore_patterns=["checkpoint-*"])
    trainer.accelerator.wait_for_everyone()  # the others wait while the main process writes
    trainer.accelerator.end_training()  # then every process leaves the process group (DDP) before exiting


if __name__ == "__main__":
    main()
