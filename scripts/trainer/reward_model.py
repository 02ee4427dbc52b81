"""A reward model with TRL's RewardTrainer: a sequence-classification head that scores a chosen answer above a rejected one.

Teaches reward modelling (the first half of RLHF): the checkpoint's body with a one-output head
(`AutoModelForSequenceClassification`, `num_labels=1`) reads a whole conversation and returns one number; the
Bradley-Terry loss, -log sigmoid(score(chosen) - score(rejected)), trains it on the same preference rows DPO takes.
`RewardConfig` flags (`--max_length`, `--center_rewards_coefficient`, ...) and TRL's model flags (`--use_peft`, ...)
are on the command line. The held-out accuracy is the share of pairs scored the right way round (chance is 50%). The
saved folder is a reward for GRPO (`grpo.py --reward_funcs <folder>`) and scores any text (below). With no arguments:
the rating task's pairs (right rating chosen, a wrong one rejected) on the `tiny` preset after `--sft_start_steps` of
SFT (the same start as dpo.py and grpo.py), offline, in a few minutes on a CPU.

    python scripts/trainer/reward_model.py                                          # tiny preset, CPU or one GPU
    python scripts/trainer/reward_model.py --model output/trainer/sft --dataset pairs.jsonl
    python scripts/trainer/reward_model.py --model <checkpoint> --dataset trl-lib/ultrafeedback_binarized --use_peft \\
        --dataset_test_split test --max_length 1024
    accelerate launch --config_file accelerate_config.yaml scripts/trainer/reward_model.py --model small   # DDP

Score a conversation from the command line (the folder holds the tokenizer and its chat template):

    python -c "import sys; from transformers import pipeline; p = pipeline('text-classification', 'output/trainer/reward_model'); \\
      print(p(p.tokenizer.apply_chat_template([{'role': 'user', 'content': sys.argv[1]}, {'role': 'assistant', \\
      'content': sys.argv[2]}], tokenize=False), function_to_apply='none'))" "The lamp is superb. Rating?" 5

Data: as dpo.py, `{"prompt", "chosen", "rejected"}` or implicit-prompt `{"chosen", "rejected"}` rows, text or
messages, from a .jsonl/.json/.parquet file or a Hub dataset; `--eval_dataset`, `--dataset_test_split` or `--eval_size`.

Docs: https://huggingface.co/docs/trl/reward_trainer  https://arxiv.org/abs/2203.02155 (InstructGPT, section 3.5)
      docs/preference-and-rl.md
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

from transformers import HfArgumentParser
from trl import RewardConfig, RewardTrainer, get_peft_config

from hftrain import preference
from hftrain.preemption import PreemptionCallback
from hftrain.reporting import ThroughputCallback


def main() -> None:
    parser = HfArgumentParser((preference.DataArguments, RewardConfig, preference.ModelArguments))
    parser.set_defaults(
        **preference.PAIR_DEFAULTS,
        output_dir="output/trainer/reward_model",
        max_steps=100,
        eval_on_start=True,  # the held-out pair accuracy of the untrained head
        lora_task_type="SEQ_CLS",  # PEFT keeps the new score head trainable and saves it with the adapter
    )
    # a preset's SFT start: 3e-4 (at 1e-3 the head's scores collapsed to one value, measured); a checkpoint's are gentler
    args, training_args, model_args = preference.parse_args(parser, learning_rates=(3e-4, 1e-3))  # full, LoRA
    training_args.include_num_input_tokens_seen = "non_padding"
    checkpoint = preference.check_run("reward_model.py", args, training_args, model_args)

    data = preference.load_rows("preference", args, training_args.seed)
    task = "rating" if args.dataset == "synthetic" else "preference"
    tokenizer, _ = preference.load_tokenizer(model_args.model_name_or_path, data["train"], args.chat_template, training_args)
    # a preset: the body that its short SFT start taught to read reviews (the score head starts random), or its
    # random weights saved, as RewardTrainer loads the model from a folder
    base = preference.start_model(model_args.model_name_or_path, tokenizer, args.sft_start_steps, training_args, save=True)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    # How TRL loads it (from_pretrained): safetensors only, and no layers swapped for kernels fetched from the Hub.
    attn = model_args.attn_implementation or "sdpa"
    training_args.model_init_kwargs = {"dtype": dtype, "attn_implementation": attn, "use_safetensors": True, "use_kernels": False}

    throughput = ThroughputCallback(seq_len=training_args.max_length or 512)
    trainer = RewardTrainer(
        model=base,  # loaded as AutoModelForSequenceClassification with num_labels=1: the body, and a new score head
        args=training_args,  # max_length, center_rewards_coefficient, ...
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,  # saved beside the model, with the chat template GRPO renders completions with
        peft_config=get_peft_config(model_args),
        callbacks=[throughput, PreemptionCallback()],
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()

    first = next(row for row in trainer.state.log_history if "eval_accuracy" in row)
    figures = {
        "method": "reward model (TRL RewardTrainer)",
        "model_kind": "sequence classifier",
        "eval_accuracy_before": first["eval_accuracy"] if first["step"] == 0 else None,
        "accuracy_kind": "held-out pairs scored chosen above rejected",
        "card_metrics": ["eval_margin", "eval_loss"],
    }
    curves = ["margin", "eval_margin"]
    preference.write_run(trainer, figures, train_result, base, args.dataset, task, throughput, curves, eval_metrics)


if __name__ == "__main__":
    main()
