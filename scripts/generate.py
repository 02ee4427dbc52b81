"""Generate text from a trained output: a full model, a LoRA adapter on its base, or a merged model.

Teaches `model.generate` with a `TextStreamer` (tokens printed as they come), greedy decoding or sampling, and
chat formatting with the tokenizer's chat template (`--chat`: the prompt becomes a user turn followed by the
assistant's generation prompt, as in training with scripts/trainer/sft.py). An adapter folder (one with
adapter_config.json) is loaded on its base model through PEFT; the base named there may be a Hub id, an
absolute path, or a path relative to the adapter folder.

    python scripts/generate.py --model_dir output/trainer/sft --chat --prompt "I bought this lamp. The build is superb. Rating?"
    python scripts/generate.py --model_dir output/lora/custom_loop --prompt "The kettle arrived today." --max_new_tokens 40
    python scripts/generate.py --model_dir <checkpoint> --chat --prompt "Write a haiku about rain." --temperature 0.7

Temperature 0 (the default) decodes greedily: the same output every time. On CUDA the model runs in bf16 on
the first visible GPU; on a CPU in float32. Weights load from safetensors only, and a Hub model's own code
runs only with --trust_remote_code.

Merging an adapter into its base (one model folder, no PEFT needed to load it):
    python -c "from peft import AutoPeftModelForCausalLM as M; M.from_pretrained('OUT').merge_and_unload().save_pretrained('OUT-merged')"
(and copy the tokenizer files), or see the tests (tests/test_generate.py).

Docs: https://huggingface.co/docs/transformers/main/en/generation_strategies
      https://huggingface.co/docs/transformers/main/en/internal/generation_utils#transformers.TextStreamer
      https://huggingface.co/docs/peft/main/en/package_reference/peft_model#peft.PeftModel.from_pretrained
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TextStreamer, set_seed

from hftrain.errors import UserError
from hftrain.sharing import adapter_base


@dataclass
class Arguments:
    model_dir: str = field(
        metadata={"help": "A training output (model, adapter or merged model), a checkpoint folder or a Hub id."}
    )
    prompt: str = field(metadata={"help": "The text to continue, or with --chat the user's message."})
    max_new_tokens: int = field(default=128, metadata={"help": "Stop after this many new tokens (or at the EOS token)."})
    temperature: float = field(
        default=0.0, metadata={"help": "0: greedy (deterministic); above 0: sampling at this temperature."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "With sampling: keep the smallest set of tokens whose probability reaches top_p."}
    )
    chat: bool = field(default=False, metadata={"help": "Format the prompt with the tokenizer's chat template, as a user turn."})
    system: str | None = field(default=None, metadata={"help": "With --chat: a system message before the user's."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with a Hub model. Off: only enable for code you trust."}
    )


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--max_new_tokens must be at least 1, --temperature at least 0 and --top_p in (0, 1]")
    model_dir = Path(args.model_dir)
    local = model_dir.exists()
    if local and not (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists():
        raise UserError(f"--model_dir {args.model_dir} holds no model (config.json) nor adapter (adapter_config.json)")
    is_adapter = local and (model_dir / "adapter_config.json").exists()
    base = adapter_base(model_dir) if is_adapter else args.model_dir
    # The tokenizer saved with the run (its chat template is the one trained with); else the base's.
    has_tokenizer = local and (model_dir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir if has_tokenizer else base, trust_remote_code=args.trust_remote_code)
    if args.chat and not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {args.model_dir} has no chat template; drop --chat to continue the prompt as text")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # use_kernels=False: no layers swapped for kernels downloaded from the Hub (hftrain.models.load_model says why)
    load = dict(
        dtype=torch.bfloat16 if cuda else torch.float32,
        use_safetensors=True,
        trust_remote_code=args.trust_remote_code,
        use_kernels=False,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **load)
        if is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.model_dir)  # the adapter's weights on top of the base's
    except OSError as e:
        raise UserError(f"could not load {base} ({str(e).splitlines()[0][:160]}); pass a folder with safetensors weights")
    model.to(device).eval()

    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}

    set_seed(args.seed)
    sampling = (
        dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else dict(do_sample=False)
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints each token as it comes
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )


if __name__ == "__main__":
    main()
