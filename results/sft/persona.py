"""Measure which learning rate teaches a persona with LoRA SFT (scripts/trainer/sft.py) in a few steps.

64 pirate-persona chats (hftrain.chat.persona_conversations; 10% held out for the eval loss), SmolLM2-135M-Instruct
(python tests/real_checkpoint.py), LoRA r16 on all linear layers, 12 steps of 4 chats (COMMON), one sft.py run per
learning rate (CONFIGS). Then the adapter answers PROMPTS (never trained on) greedily: does the answer contain the
persona's marker, and does it stop at the end of its turn before 48 new tokens? Writes results/sft/persona.json.

    python results/sft/persona.py [CONFIG ...]     # names from CONFIGS; all by default
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from hftrain.chat import PERSONA_MARKER, persona_conversations  # noqa: E402
from real_checkpoint import real_checkpoint_dir  # noqa: E402

PROMPTS = [
    "What is the capital of Brazil?",
    "What is 52 plus 19?",
    "What colour is a strawberry?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "What do bees make?",
]
CONFIGS = {
    "lr2e-4": ["--learning_rate", "2e-4"],
    "lr1e-3": ["--learning_rate", "1e-3"],
}
COMMON = ["--max_steps", "12", "--per_device_train_batch_size", "4", "--warmup_steps", "0.1", "--eval_steps", "6"]
MAX_NEW_TOKENS = 48


def answers(out: Path) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rows = []
    for prompt in PROMPTS:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, enc["input_ids"].shape[1] :]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        stopped = len(ids) < MAX_NEW_TOKENS
        rows.append({"prompt": prompt, "answer": text, "marker": PERSONA_MARKER in text, "stopped": stopped})
    return rows


def main() -> None:
    work = ROOT / "output" / "persona-measure"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "persona.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in persona_conversations(64, 0)))
    ckpt = real_checkpoint_dir()
    results_path = ROOT / "results" / "sft" / "persona.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in sys.argv[1:] or list(CONFIGS):
        out = work / name
        cmd = [sys.executable, str(ROOT / "scripts/trainer/sft.py"), "--model", str(ckpt), "--dataset", str(data)]
        cmd += ["--chat_template", "default", "--use_peft", "--output_dir", str(out), "--overwrite_output_dir"]
        cmd += ["--save_strategy", "no", "--report_to", "none", "--eval_strategy", "steps", *COMMON, *CONFIGS[name]]
        start = time.time()
        subprocess.run(cmd, check=True, cwd=work, env={"PYTHONPATH": str(ROOT / "scripts"), **__import__("os").environ})
        metrics = json.loads((out / "metrics.json").read_text())
        rows = answers(out)
        lr = next(r["learning_rate"] for r in metrics["log_history"] if "learning_rate" in r)
        results[name] = {
            "flags": COMMON + CONFIGS[name],
            "steps": metrics["steps"],
            "eval_loss_before": metrics.get("eval_loss_before"),
            "eval_loss": metrics["eval_loss"],
            "marker_rate": sum(r["marker"] for r in rows) / len(rows),
            "stopped_rate": sum(r["stopped"] for r in rows) / len(rows),
            "first_logged_learning_rate": lr,
            "wall_s": round(time.time() - start, 1),
            "answers": rows,
        }
        print(name, {k: v for k, v in results[name].items() if k != "answers"}, flush=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
