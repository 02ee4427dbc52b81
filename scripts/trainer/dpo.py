"""Preference tuning after SFT with TRL's DPOTrainer: learn from pairs of answers, one preferred, without a reward model.

Teaches Direct Preference Optimization (DPO): each row holds a prompt, a `chosen` and a `rejected` answer; the loss
raises the policy's log-probability ratio (against a frozen reference model) of the chosen answer over the rejected
one, `--beta` setting how far it may move from the reference. `DPOConfig` flags (`--beta`, `--loss_type`,
`--max_length`, `--precompute_ref_log_probs`, ...) and TRL's model flags (`--use_peft`, `--lora_r`, ...) are on the
command line. With LoRA the reference is the same base with the adapter switched off (no second copy in memory);
full fine-tuning keeps a frozen copy. The default `--loss_type sigmoid sft` adds the chosen answer's log-likelihood
to DPO's loss (as RPO does), which keeps DPO from lowering the chosen answer along with the rejected one; `--loss_type
sigmoid` is DPO alone, and every other DPOConfig loss (`ipo`, `apo_zero`, ...) is a flag away. With no arguments:
the rating task as pairs (chosen the right rating, rejected a wrong one) on the `tiny` preset, which first gets
`--sft_start_steps` of SFT so that it answers with a digit at all (random weights cannot, and a preference between
two digits then says nothing to greedy decoding); the held-out greedy accuracy before and after DPO is reported
(chance is 20%), offline, in a few minutes on a CPU.

    python scripts/trainer/dpo.py                                                  # tiny preset, CPU or one GPU
    python scripts/trainer/dpo.py --model output/trainer/sft --dataset pairs.jsonl --use_peft   # after sft.py
    python scripts/trainer/dpo.py --model <checkpoint> --dataset trl-lib/ultrafeedback_binarized --use_peft \\
        --dataset_test_split test --max_length 1024
    accelerate launch --config_file accelerate_config.yaml scripts/trainer/dpo.py --model small   # DDP

Data (`--dataset`): a .jsonl/.json/.parquet file or a Hub dataset (`--dataset_config_name`, `--dataset_train_split`)
with rows `{"prompt", "chosen", "rejected"}`, each text or a list of messages (then the chat template renders
them), or implicit-prompt rows `{"chosen", "rejected"}` of whole conversations. `--eval_dataset` or
`--dataset_test_split` is held out, else `--eval_size` of the rows: every run ends with held-out metrics
(`eval_rewards/accuracies`: the share of pairs whose chosen answer gains more than the rejected one).

Docs: https://huggingface.co/docs/trl/dpo_trainer  https://arxiv.org/abs/2305.18290
      docs/preference-and-rl.md (the path SFT -> DPO or reward model -> GRPO)
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import torch
from transformers import HfArgumentParser
from trl import DPOConfig, DPOTrainer, get_peft_config

from hftrain import preference
from hftrain.models import load_model
from hftrain.preemption import PreemptionCallback
from hftrain.reporting import ThroughputCallback


def main() -> None:
    parser = HfArgumentParser((preference.DataArguments, DPOConfig, preference.ModelArguments))
    parser.set_defaults(
        **preference.PAIR_DEFAULTS,
        output_dir="output/trainer/dpo",
        max_steps=150,
        beta=0.1,
        # DPO (sigmoid) plus the chosen answer's own log-likelihood (as RPO): DPO alone lowers the chosen answer's
        # probability together with the rejected one's (rating task, greedy accuracy: 0.385 -> 0.12 alone, -> 0.88 with
        # the added term, which alone reaches 0.87: docs/preference-and-rl.md); --loss_type sigmoid for DPO alone
        loss_type=["sigmoid", "sft"],
        eval_on_start=True,  # eval_rewards/* at step 0: margins 0 and accuracy ~0, the reference's own view
    )
    # learning rates: the script's own for a preset's SFT start (full, LoRA); a checkpoint's are gentler, printed
    args, training_args, model_args = preference.parse_args(parser, learning_rates=(1e-3, 2e-3))
    training_args.include_num_input_tokens_seen = "non_padding"  # tokens/s counts real tokens
    checkpoint = preference.check_run("dpo.py", args, training_args, model_args)

    # Every row is checked before anything is loaded or written.
    data = preference.load_rows("preference", args, training_args.seed)
    model_name = model_args.model_name_or_path
    tokenizer, _ = preference.load_tokenizer(model_name, data["train"], args.chat_template, training_args)
    # a preset: its short SFT start, or its random weights saved (the reference, or an adapter's base, loads them)
    base = preference.start_model(model_name, tokenizer, args.sft_start_steps, training_args, save=True)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    attn = model_args.attn_implementation or "sdpa"
    model = load_model(base, tokenizer, dtype=dtype, attn_implementation=attn)
    rating = args.dataset == "synthetic"
    before = preference.greedy_accuracy(model, tokenizer, data["test"]) if rating else None

    throughput = ThroughputCallback(seq_len=training_args.max_length or 512)
    # LoRA: the reference is the policy with its adapter switched off, no second copy; full fine-tuning: a frozen copy,
    # unless --precompute_ref_log_probs (the policy computes them before its first step, no copy kept)
    frozen_copy = not model_args.use_peft and not training_args.precompute_ref_log_probs
    ref_model = load_model(base, tokenizer, dtype=dtype, attn_implementation=attn) if frozen_copy else None
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,  # beta, loss_type, max_length, precompute_ref_log_probs, ...
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,  # its chat template renders conversational rows; saved beside the model
        peft_config=get_peft_config(model_args),  # None without --use_peft
        callbacks=[throughput, PreemptionCallback()],
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()

    main = trainer.is_world_process_zero()  # the one that writes the results
    after = preference.greedy_accuracy(trainer.model, tokenizer, data["test"]) if rating and main else None
    figures = {
        "method": "DPO (TRL DPOTrainer)",
        **({"eval_accuracy_before": before, "eval_accuracy": after} if rating else {}),
        "accuracy_kind": "greedy answer" if rating else None,
    }
    task = "rating" if rating else "preference"
    curves = ["rewards/margins", "eval_rewards/margins"]
    preference.write_run(trainer, figures, train_result, base, args.dataset, task, throughput, curves, eval_metrics)


if __name__ == "__main__":
    main()
