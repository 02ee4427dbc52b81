"""Generate text from a trained output: a full model, a LoRA adapter on its base, or a merged model; or chat with it.

Teaches `model.generate` with a `TextStreamer` (tokens printed as they come): greedy decoding or sampling
(`--temperature`, `--top_p`), the two usual cures for loops (`--repetition_penalty`, `--no_repeat_ngram_size`), and
chat formatting with the tokenizer's chat template (`--chat`: each prompt becomes a user turn followed by the
assistant's generation prompt, as in training with scripts/trainer/sft.py). Without `--prompt` the prompts are read
import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)
from the terminal (or stdin), one per line; with `--chat` that is a conversation whose history every answer sees
(`/reset` starts a new one). The chat template's own system prompt (a checkpoint's default one, or the one trained
with) stays unless `--system` replaces it. An adapter folder (one with adapter_config.json) is loaded on its base
model through PEFT; the base named there may be a Hub id, an absolute path, or a path relative to the adapter folder.

    python scripts/generate.py --model_dir output/trainer/sft --chat                  # a conversation; Ctrl-D ends it
    python scripts/generate.py --model_dir output/trainer/sft --chat --prompt "I bought this lamp. The build is superb. Rating?"
    python scripts/generate.py --model_dir output/lora/custom_loop --prompt "The kettle arrived today." --max_new_tokens 40
    python scripts/generate.py --model_dir <checkpoint> --chat --temperature 0.7 --top_p 0.9 --repetition_penalty 1.1

Temperature 0 (the default) decodes greedily: the same output every time, and a small model often repeats itself;
sampling (`--temperature 0.7 --top_p 0.9`) and `--repetition_penalty 1.1` (or `--no_repeat_ngram_size 3`) avoid it.
On CUDA the model runs in bf16 on the first visible GPU; on a CPU in float32. The model and its tokenizer are
checked as the training scripts check them; weights load from safetensors only, and a Hub model's own code runs
only with --trust_remote_code.

Merging an adapter into its base (one model folder, no PEFT needed to load it):
    python -c "from peft import AutoPeftModelForCausalLM as M; M.from_pretrained('OUT').merge_and_unload().save_pretrained('OUT-merged')"
(and copy the tokenizer files), or see the tests (tests/test_generate.py).

Docs: https://huggingface.co/docs/transformers/main/en/generation_strategies
      https://huggingface.co/docs/transformers/main/en/internal/generation_utils#transformers.TextStreamer
      https://huggingface.co/docs/peft/main/en/package_reference/peft_model#peft.PeftModel.from_pretrained
"""

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TextStreamer, set_seed

from hftrain.errors import UserError
from hftrain.models import check_vocabulary, load_config, load_model, load_tokenizer
from hftrain.sharing import adapter_base


@dataclass
class Arguments:
    model_dir: str = field(
        metadata={"help": "A training output (model, adapter or merged model), a checkpoint folder or a Hub id."}
    )
    prompt: str | None = field(
        default=None,
        metadata={"help": "The text to continue, or with --chat the user's message; without it, prompts are read from stdin."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Stop after this many new tokens (or at the EOS token)."})
    temperature: float = field(
        default=0.0, metadata={"help": "0: greedy (deterministic); above 0: sampling at this temperature (e.g. 0.7)."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "With sampling: keep the smallest set of tokens whose probability reaches top_p."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Above 1 (e.g. 1.1): tokens already in the text become less likely; 1: off."}
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Never repeat an n-gram of this many tokens (e.g. 3); 0: off."}
    )
    chat: bool = field(
        default=False, metadata={"help": "Format prompts with the tokenizer's chat template, as user turns of one conversation."}
    )
    system: str | None = field(
        default=None, metadata={"help": "With --chat: a system message, instead of the chat template's own default."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with a Hub model. Off: only enable for code you trust."}
    )


def prompts(args: Arguments) -> Iterator[str]:
    """--prompt, or one line at a time from the terminal or stdin until its end (Ctrl-D)."""
    if args.prompt is not None:
        yield args.prompt
        return
    tty = sys.stdin.isatty()
    if tty:
        print("Type a message and Enter" + (" (/reset: a new conversation)" if args.chat else "") + "; Ctrl-D ends.")
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            return
        if line.strip():
            yield line


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--max_new_tokens must be at least 1, --temperature at least 0 and --top_p in (0, 1]")
    if args.repetition_penalty <= 0 or args.no_repeat_ngram_size < 0:
        raise UserError("--repetition_penalty must be above 0 (1: off) and --no_repeat_ngram_size 0 or more (0: off)")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give the text to continue, or leave --prompt out to type prompts one per line")
    model_dir = Path(args.model_dir)
    local = model_dir.exists()
    if local and not (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists():
        raise UserError(f"--model_dir {args.model_dir} holds no model (config.json) nor adapter (adapter_config.json)")
    is_adapter = local and (model_dir / "adapter_config.json").exists()
    base = adapter_base(model_dir) if is_adapter else args.model_dir
    config = load_config(base, args.trust_remote_code)  # a broken config, a Hub id offline: one sentence
    # The tokenizer saved with the run (its chat template is the one trained with); else the base's.
    has_tokenizer = local and (model_dir / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(args.model_dir if has_tokenizer else base, args.trust_remote_code)
    check_vocabulary(args.model_dir, config, tokenizer)
    if args.chat and not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {args.model_dir} has no chat template; drop --chat to continue the prompt as text")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # The training scripts' checks too: safetensors weights there, the real cause in one sentence.
    model = load_model(base, tokenizer, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=args.trust_remote_code)
    if is_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, args.model_dir)  # the adapter's weights on top of the base's
        except Exception as e:
            raise UserError(
                f"could not load the adapter in {args.model_dir} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            )
    model.to(device).eval()

    set_seed(args.seed)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **(
            dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
            if args.temperature > 0
            else dict(do_sample=False)
        ),
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints each token as it comes
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []  # with --chat: the conversation so far, which every answer sees
    for prompt in prompts(args):
        if args.chat and prompt.strip() == "/reset":
            history = []
            print("(a new conversation)", file=sys.stderr)
            continue
        if args.chat:
            history.append({"role": "user", "content": prompt})
            inputs = tokenizer.apply_chat_template(
                system + history, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            output = model.generate(**inputs, streamer=streamer, **settings)
        if args.chat:
            answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            history.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    main()
