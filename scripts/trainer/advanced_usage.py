"""The Trainer customised three ways: TrainingArguments, a subclass, and callbacks.

1. TrainingArguments: evaluate and save every 50 steps, keep the best checkpoint by
   accuracy and load it at the end, warmup then a cosine schedule, gradient accumulation,
   dataloader workers, bf16 on GPUs.
2. A subclass, `CompletionOnlyTrainer`: the loss covers only the answer (the rating and the
   end-of-text token), not the review, so the model spends its capacity on the task.
3. Callbacks: `EarlyStoppingCallback` stops when accuracy stops improving, the project's
   `ThroughputCallback` measures tokens/s, MFU and peak memory, and `TargetAccuracyCallback`
   below shows how to write one: it stops training once a target accuracy is reached.

    python scripts/trainer/advanced_usage.py
    accelerate launch --config_file accelerate_config.yaml scripts/trainer/advanced_usage.py --model small

Docs: https://huggingface.co/docs/transformers/main_classes/trainer (subclassing)
      https://huggingface.co/docs/transformers/main_classes/callback
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, set_seed

from hftrain.cli import ScriptArguments
from hftrain.models import load_model
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


@dataclass
class AdvancedArguments(ScriptArguments):
    target_accuracy: float = field(
        default=1.0, metadata={"help": "Stop once eval accuracy reaches this (1.0: never stop early for it)."}
    )
    early_stopping_patience: int = field(default=3, metadata={"help": "Evaluations without improvement before stopping."})


class CompletionOnlyTrainer(Trainer):
    """Computes the loss on the answer only; the prompt tokens carry no loss."""

    # Our loss is a mean over this micro-batch, so the Trainer must still divide it by the
    # accumulation steps. That equals the mean over the whole accumulated batch only because
    # every example has the same number of answer tokens (2); for answers of varying length,
    # mask the prompt in the collator instead, so the Trainer counts the tokens across micro-batches.
    loss_is_scaled_for_ga = False

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        prompt_len = inputs.pop("prompt_len")
        labels = inputs.pop("labels")
        positions = torch.arange(labels.shape[1], device=labels.device)
        labels = labels.masked_fill(positions[None, :] < prompt_len[:, None], -100)
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].float()  # logits at t predict token t + 1
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return (loss, outputs) if return_outputs else loss


class TargetAccuracyCallback(TrainerCallback):
    """Stops training once eval accuracy reaches a target: callbacks steer through `control`."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kwargs: Any) -> None:
        if metrics.get("eval_accuracy", 0.0) >= self.target:
            print(f"\neval accuracy {metrics['eval_accuracy']:.3f} reached the target {self.target}: stopping")
            control.should_training_stop = True


def main() -> None:
    # 1. TrainingArguments: the project's defaults (hftrain/trainer.py) changed where this script teaches.
    args, training_args, checkpoint = parse_args(
        AdvancedArguments,
        output_dir="output/trainer/advanced_usage",
        num_train_epochs=4,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # 32 examples per optimizer step on each device
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a float below 1 is a fraction of the total steps
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=50,
        save_strategy="steps",  # must match eval_strategy for load_best_model_at_end
        save_steps=50,
        save_total_limit=2,  # the best checkpoint is always kept, besides the newest
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        dataloader_num_workers=1,  # collate the next batches in a worker process while the model trains
        remove_unused_columns=False,  # keep `prompt_len` for CompletionOnlyTrainer
    )
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    model = load_model(args.model, data.tokenizer, trust_remote_code=args.trust_remote_code)

    trainer = build_trainer(
        model,
        training_args,
        data,
        trainer_class=CompletionOnlyTrainer,  # 2. the subclass
        callbacks=[  # 3. callbacks (the project's ThroughputCallback is added by build_trainer)
            EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience),
            TargetAccuracyCallback(args.target_accuracy),
        ],
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()  # the best checkpoint's model, loaded at the end
    trainer.save_model()
    write_run_summary(trainer, data, train_result, eval_metrics, best_checkpoint=trainer.state.best_model_checkpoint)


if __name__ == "__main__":
    main()
