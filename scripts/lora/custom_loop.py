"""LoRA in a hand-written loop, on one device: train a low-rank adapter on every linear layer.

Teaches parameter-efficient fine-tuning with PEFT, as a diff against basic/custom_loop.py:
`get_peft_model` freezes the base model and adds a trainable low-rank update B·A (rank r,
scaled by alpha / r) beside every linear layer of the blocks (`target_modules="all-linear"`);
only the adapter's parameters reach the optimizer; `save_pretrained` writes the adapter alone
(a few hundred KB); `--merge_and_save` also folds B·A into the weights (`merge_and_unload`)
and saves a plain model in output_dir/merged. A preset's random base weights exist nowhere
else, so they are saved too (output_dir/base) and the adapter's config points at them:
`PeftModel.from_pretrained` and scripts/evaluate_model.py reload the adapter on its base.

    python scripts/lora/custom_loop.py                                     # one GPU, or the CPU
    python scripts/lora/custom_loop.py --model path/to/checkpoint --merge_and_save
    python scripts/evaluate_model.py --model_dir output/lora/custom_loop   # base + adapter

All GPUs (DDP), or several CPU processes, take the accelerate twin:

    accelerate launch --config_file accelerate_config.yaml scripts/lora/custom_loop_accelerate.py --model small
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        scripts/lora/custom_loop_accelerate.py --per_device_train_batch_size 16   # 2 CPU processes (gloo)

Docs: https://huggingface.co/docs/peft/developer_guides/lora
      https://huggingface.co/docs/peft/developer_guides/checkpoint (saving, loading, merging)
      https://arxiv.org/abs/2106.09685 (LoRA)
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler, set_seed

from hftrain.cli import check_batch_size, check_loop_args, check_output_dir, parse_command_line
from hftrain.data import PadCollator, load_prepared
from hftrain.loops import LogHistory, LoopTrainingArguments, accumulation_groups, evaluate, num_targets, num_tokens, tensorboard
from hftrain.lora import LoraArguments, trained_in_full
from hftrain.metrics import Accuracy
from hftrain.models import PRESETS, check_max_length, load_model
from hftrain.preemption import StopWithoutSaving
from hftrain.reporting import ThroughputMeter, flops_per_token, write_results
from hftrain.streaming import load_streamed


def main() -> None:
    parser = HfArgumentParser(LoopArguments)
    # A pretrained checkpoint is fine-tuned with a lower learning rate than a preset's random weights (printed).
    (args,) = parse_command_line(parser, adapter=True)
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
    if args.model in PRESETS:  # random base weights exist nowhere else: save them beside the adapter
        base_dir = os.path.abspath(os.path.join(args.output_dir, "base"))
        model.save_pretrained(base_dir)
        model.name_or_path = base_dir  # becomes the adapter config's base_model_name_or_path
    # A preset's embeddings and output layer are random as well. Frozen, they hold the adapter back (the random
    # lm_head's small rows cap the logits), so by default they are trained in full beside it, as copies that the adapter
    # saves ("modules_to_save"); the base keeps the originals. Pretrained ones stay frozen, as LoRA usually has them.
    # LoRA on "all-linear": every block's q, k, v, o and MLP gate, up and down projections, never the output layer.
    lora_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        **trained_in_full(args.modules_to_save, model),  # modules_to_save, and one copy for both if the model ties them
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)  # freezes every base weight: requires_grad=False
    model.print_trainable_parameters()
    meter = ThroughputMeter(flops_per_token(model, data.max_length))
    trainable = [p for p in model.parameters() if p.requires_grad]  # the adapter only: no state for frozen weights
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)

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

    model.save_pretrained(args.output_dir)  # the adapter and modules_to_save copies, not the base: adapter_*.{json,safetensors}
    data.tokenizer.save_pretrained(args.output_dir)
    if args.merge_and_save:  # W + (alpha / r)·B·A folded into each weight: a plain model that loads without PEFT
        merged_dir = os.path.join(args.output_dir, "merged")
        model.merge_and_unload().save_pretrained(merged_dir)
        data.tokenizer.save_pretrained(merged_dir)
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
class LoopArguments(LoraArguments, LoopTrainingArguments):
    """This loop's flags beside LoopTrainingArguments' (hftrain/loops.py: model, data, epochs, batch sizes, schedule, ...)
    and LoraArguments' (hftrain/lora.py: --lora_r, --lora_alpha, --lora_dropout, --modules_to_save)."""

    output_dir: str = field(
        default="output/lora/custom_loop", metadata={"help": "Where the adapter, metrics.json, the PNG and TensorBoard logs go."}
    )
    learning_rate: float = field(
        default=1e-2, metadata={"help": "Peak learning rate of AdamW; a LoRA adapter takes a higher one than full training."}
    )
    merge_and_save: bool = field(
        default=False, metadata={"help": "Also save the base with the adapter merged in, in output_dir/merged."}
    )


if __name__ == "__main__":
    main()
