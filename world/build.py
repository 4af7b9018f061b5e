"""Build the embedded tiny world, deterministically (seeded), with the project's own sft.py:

    python world/build.py            # about 10 minutes on 2 CPU cores

The task: integer addition and subtraction, "37+58=" -> "95", "12-40=" -> "-28", operands 0..99.
  in-distribution (ID): problems whose operands avoid 70..79; 500 held-out test problems
  out-of-distribution (OOD): 500 problems with an operand in 70..79, values never seen in training
Writes into world/:
  tokenizer + student/            base student (SFT'd briefly: ID accuracy between 15% and 60%)
  teacher_large/, teacher_small/  two teachers of different size and seed (ID accuracy >= 85%)
  sft.jsonl      {prompt, completion}                 every training problem with its answer
  prompts.jsonl  {prompt, answer, teacher_responses}  every training problem, with both teachers'
                                                      greedy responses (RL and distillation)
  teacher_sft.jsonl {prompt, completion}              every teacher response of prompts.jsonl (the
                                                      SFT stage of the SFT-then-RL baseline)
  prefs.jsonl    {prompt, chosen, rejected}           pairs sampled from the base student
  test_id.jsonl, test_ood.jsonl  {prompt, answer}
"""

import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import (Dist, WORLD, decode_responses, load_model, load_tokenizer, micro_batches,  # noqa: E402
                    prompt_ids, reward, sample)

SEED = 1234
CHARS = "0123456789+-="
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
STUDENT_TARGET = 0.25  # the student trains in rounds of 100 steps until it first reaches this
PREF_PROMPTS = 4000


def held_out(prompt):
    """OOD rule: an operand in 70..79. No training problem has one, so these operand values are
    never seen in a prompt (the digit 7 still appears elsewhere, and in answers)."""
    return any(70 <= int(x) <= 79 for x in re.findall(r"\d+", prompt))


def problems():
    """Every two-operand problem: a+b and a-b for a, b in 0..99."""
    return [f"{a}{op}{b}=" for a in range(100) for b in range(100) for op in "+-"]


def solve(prompt):
    return str(eval(prompt[:-1]))  # the prompts are our own arithmetic strings


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def make_tokenizer(folder):
    """A character-level tokenizer that AutoTokenizer loads from the folder (BOS added to prompts)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)
    return len(vocab)


def make_init(folder, vocab_size, hidden, layers, heads):
    """A folder with a tokenizer and a Qwen2 config but no weights: sft.py starts it from random."""
    from transformers import Qwen2Config
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(folder)


def sft(init, out, steps, seed):
    """Train with the project's sft.py; returns its summary."""
    subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(init), "--out", str(out), "--steps", str(steps),
                    "--seed", str(seed), "--lr", "1e-3", "--batch-size", "128", "--micro-batch-size", "128",
                    "--warmup-steps", "50", "--data", str(WORLD / "sft.jsonl")], check=True)
    return json.loads((Path(out) / "summary.json").read_text())


@torch.no_grad()
def respond(folder, prompts, n, greedy, batch_size=512):
    """n (response, sequence log-prob) per prompt from the model in `folder` (greedy, or sampled at
    temperature 1)."""
    d = Dist(0, 1, torch.device("cpu"))
    model, tok = load_model(folder, d, trainable=False), load_tokenizer(folder)
    out = []
    for chunk in micro_batches([p for p in prompts for _ in range(n)], batch_size):
        batch = sample(model, tok, [prompt_ids(tok, p) for p in chunk], d, max_new_tokens=8, greedy=greedy)
        out += zip(decode_responses(tok, batch), batch["logp"].sum(-1).tolist())
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def preference_pairs(prompts, samples):
    """From k sampled responses of the base student per prompt: rejected is the first wrong sample,
    chosen the first correct one, or the reference answer when none is correct. Prompts with no
    wrong sample are skipped. (Choosing the most likely wrong sample instead made DPO worse here.)"""
    pairs = []
    for p, group in zip(prompts, samples):
        right = [s for s, _ in group if reward(s, solve(p))]
        wrong = [s for s, _ in group if not reward(s, solve(p))]
        if wrong:
            pairs.append({"prompt": p, "chosen": right[0] if right else solve(p), "rejected": wrong[0]})
    return pairs


def teacher_sft_rows(prompt_rows):
    """SFT data from the teachers: one {prompt, completion} per teacher response of each prompt."""
    return [{"prompt": r["prompt"], "completion": t} for r in prompt_rows for t in r["teacher_responses"]]


def main():
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    everything = problems()
    rng.shuffle(everything)
    in_dist = [p for p in everything if not held_out(p)]
    test, train = in_dist[:500], in_dist[500:]
    write_jsonl(WORLD / "test_id.jsonl", [{"prompt": p, "answer": solve(p)} for p in test])
    write_jsonl(WORLD / "test_ood.jsonl", [{"prompt": p, "answer": solve(p)} for p in everything if held_out(p)][:500])
    write_jsonl(WORLD / "sft.jsonl", [{"prompt": p, "completion": solve(p)} for p in train])

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, hidden, layers, heads, seed in [("teacher_large", 160, 6, 4, 1), ("teacher_small", 128, 4, 4, 2)]:
            make_init(tmp / name, len(SPECIAL) + len(CHARS), hidden, layers, heads)
            results[name] = sft(tmp / name, tmp / f"{name}_run", 2000, seed)
            shutil.rmtree(WORLD / name, ignore_errors=True)
            shutil.move(str(tmp / f"{name}_run" / "model"), str(WORLD / name))
        # The student: same shape as the small teacher, another seed, stopped early.
        make_init(tmp / "student", len(SPECIAL) + len(CHARS), 128, 4, 4)
        current, round_ = tmp / "student", 0
        while round_ == 0 or results["student"]["accuracy_after"] < STUDENT_TARGET:
            round_ += 1
            results["student"] = sft(current, tmp / f"student_{round_}", 100, 100 + round_)
            current = tmp / f"student_{round_}" / "model"
        shutil.rmtree(WORLD / "student", ignore_errors=True)
        shutil.move(str(current), str(WORLD / "student"))
    for name, r in results.items():
        print(f"{name}: ID accuracy {r['accuracy_after']:.3f}, OOD accuracy {r['ood_accuracy_after']:.3f}")

    # RL / distillation prompts, with each teacher's greedy response (raw: not filtered for correctness).
    large = respond(WORLD / "teacher_large", train, 1, greedy=True)
    small = respond(WORLD / "teacher_small", train, 1, greedy=True)
    prompt_rows = [{"prompt": p, "answer": solve(p), "teacher_responses": [a[0][0], b[0][0]]}
                   for p, a, b in zip(train, large, small)]
    write_jsonl(WORLD / "prompts.jsonl", prompt_rows)
    write_jsonl(WORLD / "teacher_sft.jsonl", teacher_sft_rows(prompt_rows))

    # Preference pairs from 8 samples of the base student per prompt.
    pairs = preference_pairs(train[:PREF_PROMPTS], respond(WORLD / "student", train[:PREF_PROMPTS], 8, greedy=False))
    write_jsonl(WORLD / "prefs.jsonl", pairs)
    print(f"{len(pairs)} preference pairs, {len(train)} RL prompts")
    assert 0.15 <= results["student"]["accuracy_after"] <= 0.60, "student accuracy out of range"
    assert min(results["teacher_large"]["accuracy_after"], results["teacher_small"]["accuracy_after"]) >= 0.85


if __name__ == "__main__":
    main()
