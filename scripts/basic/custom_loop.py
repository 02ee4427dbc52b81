"""A training loop written by hand in plain PyTorch, on one device: what the Trainer does for you.

Teaches the parts every training loop has, all visible in `main()`: a DataLoader over the
prepared data, AdamW and a learning-rate schedule, gradient accumulation with the loss divided
by the target tokens of the whole accumulated batch, gradient clipping, bf16 autocast on CUDA
(float32 on CPU), an evaluation each epoch, and `save_pretrained` at the end. It runs on one
device: the current GPU if there is one (pick it with CUDA_VISIBLE_DEVICES), else the CPU.
`custom_loop_accelerate.py` is the same loop on every GPU: diff the two to see what DDP changes.

    python scripts/basic/custom_loop.py                                    # one GPU, or the CPU
    python scripts/basic/custom_loop.py --model small --learning_rate 5e-4
    python scripts/basic/custom_loop.py --help                             # every flag

All GPUs (DDP), or several CPU processes, take the accelerate twin:

    accelerate launch --config_file accelerate_config.yaml scripts/basic/custom_loop_accelerate.py --model small
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        scripts/basic/custom_loop_accelerate.py --per_device_train_batch_size 16   # 2 CPU processes (gloo)

Docs: https://huggingface.co/learn/llm-course/chapter3/4 (a full training loop)
      https://docs.pytorch.org/docs/stable/amp.html (autocast)
      https://huggingface.co/blog/gradient_accumulation (why divide by the tokens of the whole batch)
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler, set_seed

from hftrain.cli import check_batch_size, check_loop_args, check_output_dir, parse_command_line
from hftrain.data import PadCollator, load_prepared
from hftrain.loops import LogHistory, LoopTrainingArguments, accumulation_groups, evaluate, num_targets, num_tokens, tensorboard
from hftrain.metrics import Accuracy
from hftrain.models import check_max_length, load_model
from hftrain.preemption import StopWithoutSaving
from hftrain.reporting import ThroughputMeter, flops_per_token, write_results
from hftrain.streaming import load_streamed


def main() -> None:
    parser = HfArgumentParser(LoopArguments)
    # A pretrained checkpoint is fine-tuned with a lower learning rate than a preset's random weights (printed).
    (args,) = parse_command_line(parser)
    check_loop_args(args)  # sizes, steps and rates no run can use, refused as the Trainer scripts refuse them
    check_output_dir(args.output_dir, args.overwrite_output_dir, resuming=False, inputs=args)  # and take its run lock
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # "cuda": the current GPU, no hard-coded index
    # bf16 autocast on CUDA: matmuls run in bf16 while weights, gradients and AdamW's state stay float32.
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if args.streaming:  # --dataset read, tokenized and cut into blocks as training goes (hftrain/streaming.py)
        data = load_streamed(args, args.per_device_train_batch_size * args.gradient_accumulation_steps, args.seed)
    else:
        data = load_prepared(
            args.data_dir, args.dataset, args.model, args.trust_remote_code
        )  # --dataset: prepared for --model first
    set_seed(args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code).to(device)
    check_max_length(model, data.max_length)  # the data's longest example must fit the model's positions
    if not args.streaming:  # a stream has no length
        check_batch_size(args.per_device_train_batch_size, 1, len(data.train))
    meter = ThroughputMeter(flops_per_token(model, data.max_length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    collator = PadCollator(data.tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)
    generator = torch.Generator()  # the shuffling order: reseeded with seed + epoch at each epoch below
    sampler = None if args.streaming else RandomSampler(data.train, generator=generator)  # a stream is shuffled as read
    pin = device.type == "cuda"  # page-locked host memory: faster, asynchronous copies to the GPU
    train_loader = DataLoader(
        data.train, batch_size=args.per_device_train_batch_size, sampler=sampler, collate_fn=collator, pin_memory=pin
    )
    test_loader = DataLoader(data.test, batch_size=args.per_device_eval_batch_size, collate_fn=collator, pin_memory=pin)
    steps_per_epoch = args.max_steps if args.streaming else math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps
    )

    accuracy = Accuracy(data.answer_token_ids)
    history = LogHistory(tensorboard(args.output_dir))  # Trainer-style log rows, also written to TensorBoard: output_dir/runs
    step = 0
    loss_since_log = torch.zeros((), device=device)  # summed token losses and their count since the last log row
    targets_since_log = torch.zeros((), device=device)
    progress = tqdm(total=total_steps, desc="train")
    StopWithoutSaving()  # SIGTERM or Ctrl-C: stop at once with status 1, saying so (this loop writes no checkpoints)
    if args.eval_on_start:  # the "before" row: metrics.json reports it beside the final one
        history.log(0, epoch=0.0, **evaluate(model, test_loader, accuracy, device, autocast))
    meter.start()
    model.train()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        generator.manual_seed(args.seed + epoch)  # a new order each epoch, fixed by (seed, epoch)
        for micro_batches in accumulation_groups(train_loader, args.gradient_accumulation_steps):
            # Every target token weighs the same: the summed loss of each micro-batch is divided by the
            # targets of the WHOLE accumulated batch, not by its own (a mean of micro-batch means would
            # over-weight the tokens of micro-batches with few of them).
            targets = num_targets(micro_batches).to(device)
            meter.add_tokens(num_tokens(micro_batches))
            for batch in micro_batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # logits at t predict token t + 1; padding is labelled -100, which cross_entropy ignores
                loss_sum = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum"
                )
                (loss_sum / targets).backward()  # gradients add up over the micro-batches
                loss_since_log += loss_sum.detach()
            targets_since_log += targets
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update()
            if step % args.logging_steps == 0 or step == total_steps:
                loss = (loss_since_log / targets_since_log).item()  # the only GPU sync: once per log row
                history.log(step, epoch=round(step / steps_per_epoch, 3), loss=loss, learning_rate=scheduler.get_last_lr()[0])
                progress.set_postfix(loss=f"{loss:.4f}")
                loss_since_log.zero_()
                targets_since_log.zero_()
            if step == total_steps:  # --max_steps may end training mid-epoch
                break
        with meter.paused():  # evaluation is not training: tokens/s counts the training steps alone
            eval_metrics = evaluate(model, test_loader, accuracy, device, autocast)
        history.log(step, epoch=round(step / steps_per_epoch, 3), **eval_metrics)
        progress.write(
            f"epoch {step / steps_per_epoch:.3g}: eval loss {eval_metrics['eval_loss']:.4f}, accuracy {eval_metrics['eval_accuracy']:.3f}"
        )
    progress.close()
    train_metrics = meter.stop()

    model.save_pretrained(args.output_dir)  # config.json and model.safetensors
    data.tokenizer.save_pretrained(args.output_dir)
    latest = history.latest()
    write_results(
        args.output_dir,
        {
            "eval_accuracy": latest["eval_accuracy"],
            "eval_loss": latest["eval_loss"],
            "eval_samples": latest["eval_samples"],
            "train_loss": latest["loss"],
            "steps": step,
            "distributed_type": "NO",  # one process on one device
            "base_model": args.model,  # these three go into the model card (README.md) too
            "dataset": data.source,
            "task": data.task,
            **train_metrics,
        },
        history.rows,
    )


@dataclass
class LoopArguments(LoopTrainingArguments):
    """This loop's flags beside LoopTrainingArguments' (hftrain/loops.py: model, data, epochs, batch sizes, schedule, ...)."""

    output_dir: str = field(
        default="output/basic/custom_loop", metadata={"help": "Where the model, metrics.json, the PNG and TensorBoard logs go."}
    )


if __name__ == "__main__":
    main()
