"""LoRA in the hand-written accelerate loop: lora/custom_loop.py on every GPU (DDP), with checkpoints and resume.

The same adapter as lora/custom_loop.py (PEFT LoRA on every linear layer, only the adapter in
the optimizer, the adapter saved, `--merge_and_save` for a merged model in output_dir/merged)
in the loop of basic/custom_loop_accelerate.py: `prepare` wraps the PEFT model in DDP, which
all-reduces only the adapter's gradients, since the frozen base has none. Checkpoints written
by `save_state` hold the whole model, the frozen base included; the final save is the adapter
alone, written by the main process from the unwrapped model. Diff it against either twin.

    accelerate launch --config_file accelerate_config.yaml scripts/lora/custom_loop_accelerate.py --model small
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 scripts/lora/custom_loop_accelerate.py
    python scripts/lora/custom_loop_accelerate.py                          # one GPU, or the CPU
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        scripts/lora/custom_loop_accelerate.py --per_device_train_batch_size 16    # DDP on CPU (gloo)
    ... --resume_from_checkpoint latest                                     # continue a stopped run

SIGTERM (a scheduler's preemption notice) or Ctrl-C saves a checkpoint after the current step, on
every process the same (`accelerator.set_trigger` / `check_trigger`), and exits with status 143 or
130; the same command with `--resume_from_checkpoint latest` continues. The log rows go to
accelerate's trackers (`--report_to`: TensorBoard in output_dir/runs by default, W&B, MLflow, ...).

Docs: https://huggingface.co/docs/peft/accelerate/accelerate
      https://huggingface.co/docs/accelerate/usage_guides/checkpoint
      https://huggingface.co/docs/peft/developer_guides/lora
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler, set_seed

from hftrain.checkpoints import ACCELERATE_CHECKPOINT, check_same_model, resolve_checkpoint
from hftrain.cli import check_batch_size, check_loop_args, check_output_dir, parse_command_line
from hftrain.data import PadCollator, load_prepared
from hftrain.launch import check_launch
from hftrain.loops import (
    LogHistory,
    LoopTrainingArguments,
    accumulation_groups,
    evaluate,
    load_loop_state,
    num_targets,
    num_tokens,
    publish_checkpoint,
    run_name,
    save_loop_state,
)
from hftrain.lora import LoraArguments, trained_in_full
from hftrain.metrics import Accuracy
from hftrain.models import PRESETS, check_max_length, load_model
from hftrain.preemption import Preemption
from hftrain.reporting import ThroughputMeter, flops_per_token, write_results
from hftrain.streaming import load_streamed, save_stream_position


def main() -> None:
    parser = HfArgumentParser(LoopArguments)
    # A pretrained checkpoint is fine-tuned with a lower learning rate than a preset's random weights (printed).
    (args,) = parse_command_line(parser, adapter=True)
    check_loop_args(args)  # sizes, steps and rates no run can use, refused as the Trainer scripts refuse them
    # One process per device (accelerate launch starts them); bf16 autocast on CUDA, float32 on CPU. The seedable
    # sampler shuffles with seed + epoch on every process, so a resumed run replays the same order.
    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # dispatch_batches=False: each process reads its own batches; a --streaming one reads the stream and keeps its part.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, dispatch_batches=False),
        log_with=None if args.report_to == "none" else args.report_to.split(","),  # accelerate's trackers: TensorBoard, W&B...
        project_dir=args.output_dir,  # where TensorBoard's events go (output_dir/runs/<date>, as the Trainer's)
    )
    check_launch(accelerator.num_processes, accelerator.device)  # every process the launcher started joins, one per GPU
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir, ACCELERATE_CHECKPOINT)
    # The main process alone takes the output directory's run lock: a second run on the same folder stops.
    check_output_dir(args.output_dir, args.overwrite_output_dir, checkpoint is not None, accelerator.is_main_process, args)
    device = accelerator.device  # this process's device: cuda:<local rank>, or the CPU

    if args.streaming:  # --dataset read, tokenized and cut into blocks as training goes, from the checkpoint's position
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        data = load_streamed(args, per_step, args.seed, checkpoint)
    else:
        with accelerator.local_main_process_first():  # each machine's main process prepares the data; the others then load it
            data = load_prepared(
                args.data_dir, args.dataset, args.model, args.trust_remote_code
            )  # --dataset: prepared for --model first
    set_seed(args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code).to(device)
    check_max_length(model, data.max_length)  # the data's longest example must fit the model's positions
    if not args.streaming:  # a stream has no length
        check_batch_size(args.per_device_train_batch_size, accelerator.num_processes, len(data.train))
    if args.model in PRESETS:  # random base weights exist nowhere else: save them beside the adapter
        base_dir = os.path.abspath(os.path.join(args.output_dir, "base"))
        model.save_pretrained(base_dir, is_main_process=accelerator.is_main_process)
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
    if accelerator.is_main_process:  # the adapter's share of the parameters, printed once
        model.print_trainable_parameters()
    meter = ThroughputMeter(flops_per_token(model, data.max_length), num_devices=accelerator.num_processes)
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
    # DDP-wrapped model; each process's loaders now yield every num_processes-th batch, on its device.
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    steps_per_epoch = args.max_steps if args.streaming else math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps
    )

    accuracy = Accuracy(data.answer_token_ids)
    accelerator.init_trackers(run_name(), config=vars(args))  # the main process starts them, with the run's flags
    history = LogHistory(accelerator.log)  # Trainer-style log rows, also sent to accelerate's trackers (main process only)
    # The scheduler is not passed to prepare(): it would step the schedule once per process. Nor registered for
    # checkpointing: accelerate would pickle it and unpickle it on resume; its state and the history go in JSON instead.
    step = 0
    if checkpoint:
        check_same_model(checkpoint, model)  # saved from another --model: one sentence, not a size mismatch
        accelerator.load_state(checkpoint)  # weights (safetensors), optimizer and RNG states (torch.load weights_only=True)
        load_loop_state(checkpoint, scheduler, history)  # the scheduler and the log history, from the checkpoint's JSON
        step = int(os.path.basename(os.path.normpath(checkpoint)).removeprefix("checkpoint-"))
        accelerator.print(f"resuming from {checkpoint} at step {step}")
    resume_epoch, resume_steps = divmod(step, steps_per_epoch)

    def save_checkpoint() -> str:  # every process calls save_state: each writes its own RNG state
        # Written under a temporary name, renamed once complete: a crash mid-save leaves the earlier checkpoints usable.
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        accelerator.save_state(path + ".tmp")
        if accelerator.is_main_process:
            save_loop_state(path + ".tmp", scheduler, history)  # loop_state.json beside accelerate's checkpoint files
            save_stream_position(data.train, path + ".tmp", step)  # --streaming: the checkpoint's stream_state.json
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_checkpoint(path + ".tmp", path, keep=args.save_total_limit)  # and delete all but the newest few
        return path  # the checkpoint's folder, for the preemption message

    loss_since_log = torch.zeros((), device=device)  # summed token losses and their count since the last log row
    targets_since_log = torch.zeros((), device=device)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    preemption = Preemption()  # from here on SIGTERM or Ctrl-C saves a checkpoint after the step, then exits
    if args.eval_on_start and step == 0:  # the "before" row, not again when resuming: metrics.json reports it too
        history.log(0, epoch=0.0, **evaluate(model, test_loader, accuracy, device, gather=accelerator.gather_for_metrics))
    meter.start()
    model.train()
    for epoch in range(resume_epoch, math.ceil(total_steps / steps_per_epoch)):
        train_loader.set_epoch(epoch)  # the seedable sampler's order for this epoch: seed + epoch
        # A resumed run skips the micro-batches its checkpoint had already seen in this epoch, without loading them.
        # (A stream is not skipped when resuming: it was loaded at its checkpoint's position.)
        seen = resume_steps * args.gradient_accumulation_steps if epoch == resume_epoch and not args.streaming else 0
        for micro_batches in accumulation_groups(
            accelerator.skip_first_batches(train_loader, seen), args.gradient_accumulation_steps
        ):
            # Every target token weighs the same: the summed loss of each micro-batch is divided by the
            # targets of the WHOLE accumulated batch, not by its own (a mean of micro-batch means would
            # over-weight the tokens of micro-batches with few of them). Under DDP the whole batch spans
            # every process, so the count is summed across them.
            targets = accelerator.reduce(num_targets(micro_batches), "sum")
            meter.add_tokens(num_tokens(micro_batches))
            for batch in micro_batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with accelerator.accumulate(model):  # no_sync: gradients are all-reduced only on the last micro-batch
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    # logits at t predict token t + 1; padding is labelled -100, which cross_entropy ignores
                    loss_sum = F.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum"
                    )
                    # DDP averages gradients over the processes and accelerator.backward divides by the accumulation
                    # steps; `targets` already counts the tokens of every process, so undo both.
                    accelerator.backward(loss_sum / targets * accelerator.num_processes * accelerator.gradient_accumulation_steps)
                loss_since_log += loss_sum.detach()
            targets_since_log += targets
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update()
            if preemption.signum:  # this process got SIGTERM or Ctrl-C: raise its flag for check_trigger
                accelerator.set_trigger()
            # A flag on any process (check_trigger sums them): all processes log, save a checkpoint and exit after this step
            stop_at_checkpoint = step < total_steps and accelerator.check_trigger()
            if step % args.logging_steps == 0 or step == total_steps or stop_at_checkpoint:
                loss = (accelerator.reduce(loss_since_log, "sum") / targets_since_log).item()  # every process's tokens
                history.log(step, epoch=round(step / steps_per_epoch, 3), loss=loss, learning_rate=scheduler.get_last_lr()[0])
                progress.set_postfix(loss=f"{loss:.4f}")
                loss_since_log.zero_()
                targets_since_log.zero_()
            if stop_at_checkpoint:
                preemption.exit(step, save_checkpoint(), accelerator.is_main_process)  # 143 after SIGTERM, 130 after Ctrl-C
            if args.checkpointing_steps > 0 and step % args.checkpointing_steps == 0:
                save_checkpoint()
            if step == total_steps:  # --max_steps may end training mid-epoch
                break
        with meter.paused():  # evaluation is not training: tokens/s counts the training steps alone
            eval_metrics = evaluate(
                model,
                test_loader,
                accuracy,
                device,
                gather=accelerator.gather_for_metrics,
                show_progress=accelerator.is_main_process,
            )
        history.log(step, epoch=round(step / steps_per_epoch, 3), **eval_metrics)
        accelerator.print(
            f"epoch {step / steps_per_epoch:.3g}: eval loss {eval_metrics['eval_loss']:.4f}, accuracy {eval_metrics['eval_accuracy']:.3f}"
        )
        save_checkpoint()  # at every epoch end too, after the evaluation, so its row is in the saved history
    progress.close()
    preemption.restore()  # Ctrl-C stops at once again: past the last step there is no checkpoint to wait for
    # Each process counted its own tokens; tokens/s is for all of them together.
    tokens_per_process = accelerator.gather(torch.tensor([meter.tokens], device=device))
    meter.tokens = int(tokens_per_process.sum())
    train_metrics = meter.stop()

    accelerator.wait_for_everyone()
    # the adapter and modules_to_save copies, not the base (adapter_*.{json,safetensors}), written by the main process
    accelerator.unwrap_model(model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        data.tokenizer.save_pretrained(args.output_dir)
        if args.merge_and_save:  # W + (alpha / r)·B·A folded into each weight: a plain model that loads without PEFT
            merged_dir = os.path.join(args.output_dir, "merged")
            accelerator.unwrap_model(model).merge_and_unload().save_pretrained(merged_dir)
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
                "distributed_type": accelerator.distributed_type.value,  # MULTI_GPU (DDP), MULTI_CPU, or NO
                "base_model": args.model,  # these three go into the model card (README.md) too
                "dataset": data.source,
                "task": data.task,
                "train_tokens_per_process": tokens_per_process.tolist(),
                **train_metrics,
            },
            history.rows,
        )
    accelerator.wait_for_everyone()  # the others wait while the main process writes
    accelerator.end_training()  # then every process leaves the process group before exiting


@dataclass
class LoopArguments(LoraArguments, LoopTrainingArguments):
    """This loop's flags beside LoopTrainingArguments' (hftrain/loops.py: model, data, epochs, batch sizes, schedule, ...)
    and LoraArguments' (hftrain/lora.py: --lora_r, --lora_alpha, --lora_dropout, --modules_to_save)."""

    output_dir: str = field(
        default="output/lora/custom_loop_accelerate",
        metadata={"help": "Where the adapter, metrics.json, the PNG and TensorBoard logs go."},
    )
    learning_rate: float = field(
        default=1e-2, metadata={"help": "Peak learning rate of AdamW; a LoRA adapter takes a higher one than full training."}
    )
    checkpointing_steps: int = field(
        default=0, metadata={"help": "Save a checkpoint-<step> every this many steps (0: only at the end of each epoch)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep only the newest this many checkpoints (0: all)."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint-<step> folder to continue from, or 'latest' for the newest in --output_dir. "
            "Only a checkpoint inside --output_dir; nothing in it is unpickled (docs/troubleshooting.md, 'What a checkpoint holds')."
        },
    )
    merge_and_save: bool = field(
        default=False, metadata={"help": "Also save the base with the adapter merged in, in output_dir/merged."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Where accelerate's trackers send the log rows: tensorboard (output_dir/runs), wandb, mlflow, comet_ml, "
            "aim, ... (comma-separated), all (every one installed) or none."
        },
    )


if __name__ == "__main__":
    main()
