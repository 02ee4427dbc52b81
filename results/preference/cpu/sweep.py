import sys, time, random, re, os
import torch
from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer, DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
sys.path.insert(0, "/work/wt/prefrl/scripts")
from hftrain.chat import DEFAULT_CHAT_TEMPLATE, answer_accuracy, rating_conversations
from hftrain.data import load_prepared
from hftrain.models import load_model
torch.set_num_threads(1)
sft_steps = int(sys.argv[1]); method = sys.argv[2]; steps = int(sys.argv[3]); lr = float(sys.argv[4])
tok = load_prepared("data/synthetic").tokenizer
tok.chat_template = DEFAULT_CHAT_TEMPLATE
set_seed(0)
model = load_model("tiny", tok)
train = rating_conversations(2000, 0); test = rating_conversations(200, 1)
t = time.time()
cfg = SFTConfig(output_dir="sft", max_steps=sft_steps, per_device_train_batch_size=32, learning_rate=3e-3, warmup_steps=10, report_to=[], gradient_checkpointing=False, save_strategy="no", logging_steps=50, assistant_only_loss=True, bf16=False)
tr = SFTTrainer(model, args=cfg, train_dataset=Dataset.from_list(train), processing_class=tok)
tr.train(); model = tr.model
print("sft", time.time()-t, "acc", answer_accuracy(model, tok, test)); 
model.save_pretrained("start"); tok.save_pretrained("start")
rng = random.Random(0)
def pref(c):
    r = c["messages"][1]["content"]; w = rng.choice([x for x in "12345" if x != r])
    return {"prompt": c["messages"][:1], "chosen": [{"role":"assistant","content":r}], "rejected":[{"role":"assistant","content":w}]}
t = time.time()
if method == "dpo":
    rows = [pref(c) for c in train]
    cfg = DPOConfig(output_dir="dpo", max_steps=steps, per_device_train_batch_size=32, learning_rate=lr, beta=float(os.environ.get("BETA", "0.1")), loss_type=os.environ.get("LOSS", "sigmoid").split(","), report_to=[], gradient_checkpointing=False, save_strategy="no", logging_steps=20, bf16=False)
    tr = DPOTrainer(load_model("start", tok), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
else:
    rows = [{"prompt": c["messages"][:1], "rating": c["messages"][1]["content"]} for c in train]
    def rw(completions, rating, **kw):
        out = []
        for c, r in zip(completions, rating):
            m = re.search(r"\b[1-5]\b", c[0]["content"]) if os.environ.get("STRICT") is None else re.fullmatch(r"\s*([1-5])\s*", c[0]["content"])
            g = m.group().strip() if m else None
            out.append(0.0 if not m else 1.0 if g == r else 0.5 - abs(int(g)-int(r))/8)
        return out
    cfg = GRPOConfig(output_dir="grpo", max_steps=steps, per_device_train_batch_size=int(sys.argv[5]), num_generations=8, max_completion_length=4, learning_rate=lr, beta=0.0, scale_rewards=os.environ.get("SCALE", "group"), report_to=[], gradient_checkpointing=False, save_strategy="no", logging_steps=10, bf16=False)
    tr = GRPOTrainer(load_model("start", tok), reward_funcs=rw, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
tr.train()
print(method, time.time()-t, "acc", answer_accuracy(tr.model, tok, test))
for r in tr.state.log_history: print({k: round(v,3) for k,v in r.items() if k in ("step","loss","reward","rewards/margins","rewards/accuracies")})

def gen_acc(model, tok, chats):
    model.eval(); tok.padding_side = "left"; right = 0; samples = []
    for i in range(0, len(chats), 50):
        b = chats[i:i+50]
        prompts = [tok.apply_chat_template(c["messages"][:1], add_generation_prompt=True, tokenize=False) for c in b]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples += texts[:5]
        for t, c in zip(texts, b):
            m = re.search(r"\b[1-5]\b", t)
            right += bool(m) and m.group() == c["messages"][1]["content"]
    print("samples", samples[:10])
    return right / len(chats)
print("gen acc", gen_acc(tr.model, tok, test))
