"""QLoRA with the Trainer: a 4-bit NF4 base, LoRA adapters on every linear layer, an 8-bit optimizer.

Teaches the QLoRA recipe (Dettmers et al., 2023) as the libraries spell it:
1. `BitsAndBytesConfig`: the frozen base is stored in 4-bit NormalFloat (about 0.5 bytes per
   parameter instead of 2 in bf16), with double quantization of the scales; matmuls run in
   bf16 on CUDA (float32 on CPU, where bf16 matmuls are slow).
2. `prepare_model_for_kbit_training`: freezes the base, keeps norms in float32 and turns on
   gradient (activation) checkpointing, so activations are recomputed instead of stored.
3. LoRA on all linear layers (`target_modules="all-linear"`): only the adapters learn.
4. `optim="paged_adamw_8bit"` (bitsandbytes): Adam's two moments in 8 bits, in CUDA unified
   memory that pages out to CPU RAM when the GPU runs short. On CPU paging means nothing, so
   the default there is `adamw_bnb_8bit`: the same 8-bit AdamW, unpaged (it runs on CPU).
   Any `--optim` works, e.g. `adamw_torch` for 32-bit moments.

QLoRA quantizes a pretrained base. The presets have random weights, so for `--model tiny`
(`small`, `1b`) the script first builds the preset and saves it to <output_dir>/base, then
loads it from there in 4-bit; the saved adapter names that folder as its base, so
`evaluate_model.py --load_in_4bit` reloads it. On CPUs with AVX512-BF16, bitsandbytes would
silently stop LoRA training after the first evaluation; `hftrain.quantization.load_4bit`
switches that repacking off (tests/test_memory_efficient.py proves the gradients survive).

    python scripts/trainer/qlora.py                                   # tiny on CPU, ~1 min
    python scripts/trainer/qlora.py --model small                     # one GPU
    python scripts/trainer/qlora.py --model /path/to/checkpoint --dataset corpus.txt   # lr 2e-4, no modules_to_save
    python scripts/evaluate_model.py --model_dir output/trainer/qlora --load_in_4bit
    accelerate launch --config_file accelerate_config.yaml scripts/trainer/qlora.py --model small  # DDP

Why these settings learn on a preset: its frozen 4-bit base is random, not pretrained, so the
adapters must carry the whole task. Rank 16 is a quarter of the tiny preset's width (a
pretrained 4096-wide model gets by with 8-64), alpha = 2 x rank, and lr 1e-2 (3x full
fine-tuning's: few parameters, B starting at zero). Random frozen embeddings and output layer
would leave LoRA working around noise (0.60 accuracy after 200 steps on tiny), so they train in
full through modules_to_save (0.97 after 200 steps, 0.998 after the default 3 epochs).

Hardware: one GPU (CUDA) or the CPU (bitsandbytes 0.48+ has CPU 4-bit kernels); DDP puts a
4-bit copy on every GPU. To shard a base too large for one GPU, see scripts/trainer/sharded/fsdp_qlora.py.

Docs: https://huggingface.co/docs/transformers/quantization/bitsandbytes
      https://huggingface.co/docs/peft/developer_guides/quantization
      https://huggingface.co/docs/bitsandbytes/optimizers
      https://arxiv.org/abs/2305.14314 (QLoRA)
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, TrainingArguments, set_seed

from hftrain.errors import UserError
from hftrain.extras import require_extra
from hftrain.lora import LoraScriptArguments, adapter_base, lora_flags
from hftrain.models import count_parameters
from hftrain.quantization import check_4bit_device, load_4bit
from hftrain.trainer import build_trainer, load_data, parse_args, write_run_summary


def main() -> None:
    require_extra("bitsandbytes")  # the 4-bit layers and the 8-bit optimizer
    cuda = torch.cuda.is_available()
    args, training_args, checkpoint = parse_args(
        LoraScriptArguments,  # --lora_r, --lora_alpha, --lora_dropout, --modules_to_save (hftrain/lora.py)
        check=check_devices,
        output_dir="output/trainer/qlora",
        adapter=True,  # the learning rate and modules_to_save follow --model (hftrain.models.model_defaults)
        learning_rate=1e-2,  # for a preset: see "Why these settings" above
        # (eval_strategy "epoch": evaluating between epochs is exactly what the CPU repacking trap breaks)
        optim="paged_adamw_8bit" if cuda else "adamw_bnb_8bit",  # see the header: paging needs CUDA
    )
    optim = training_args.optim.value  # TrainingArguments turns the name into an enum
    data = load_data(training_args, args)
    set_seed(training_args.seed)  # the preset's random weights depend on it
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    # A preset's random weights saved (in float, on the device) for the 4-bit load; the adapter names them as its base.
    base = adapter_base(args.model, data.tokenizer, training_args, dtype=compute_dtype, device=training_args.device)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # NormalFloat4: 16 levels placed for normally distributed weights
        bnb_4bit_use_double_quant=True,  # quantize the scales too: ~0.4 bit per parameter saved
        bnb_4bit_compute_dtype=compute_dtype,  # matmuls dequantize to this dtype
    )
    model = load_4bit(
        base,
        data.tokenizer,
        compute_dtype,
        training_args.device,
        quantization_config=quantization,
        trust_remote_code=args.trust_remote_code,
    )
    # Turns on gradient checkpointing (no --activation_checkpointing needed); non-reentrant: the inputs need no grad.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    # LoRA on every nn.Linear / Linear4bit except the output layer; r, alpha, dropout and what trains in full beside the
    # adapters (modules_to_save, tied as the model ties them) from the flags.
    lora = LoraConfig(**lora_flags(args, model), target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    note = " (CPU: unpaged, paging needs CUDA)" if optim == "adamw_bnb_8bit" and not cuda else ""
    print(f"optim {optim}{note}")

    trainer = build_trainer(model, training_args, data)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model()  # the adapter (and modules_to_save) only: a few MB; the tokenizer beside it
    write_run_summary(
        trainer,
        data,
        train_result,
        eval_metrics,
        optim=optim,
        base_model=base,
        trainable_parameters=count_parameters(model, trainable_only=True),
    )


def check_devices(args: LoraScriptArguments, training_args: TrainingArguments) -> None:
    if training_args.n_gpu > 1:  # plain `python` on several GPUs would wrap the 4-bit model in DataParallel
        raise UserError(
            "QLoRA here trains on one GPU per process: set CUDA_VISIBLE_DEVICES=0, or launch one process per GPU "
            "with accelerate launch (DDP)"
        )
    check_4bit_device(training_args.device)  # before anything is built or written


if __name__ == "__main__":
    main()
