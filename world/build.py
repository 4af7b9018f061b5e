"""Build the embedded tiny world, deterministically (seeded), with the project's own sft.py:

    python world/build.py            # about 21 minutes on 2 CPU cores

The task: a chain of additions and subtractions, solved step by step. A two-digit start and two to
four one-digit steps; the reference response is the worked solution, one step per line, ";" between
lines, and the final answer is its last number (what common.reward reads):

    "37+5-8+9=" -> "37+5=42;42-8=34;34+9=43"            (23 tokens: the tokenizer is per character)

Responses are 12 to 38 tokens and EOS (23 on average); a wrong step spoils every later one and the answer.
  in-distribution (ID): problems whose start is outside 70..79; 500 held-out test problems
  out-of-distribution (OOD): 500 problems starting at 70..79, a start never seen in a training
                             prompt (the running totals of training solutions do pass through it)
Writes into world/:
  tokenizer + student/            base student: the small teacher SFT'd on solutions that drop 75% of
                                  the carries and borrows (ID accuracy between 20% and 45%)
  teacher_large/, teacher_small/  two teachers of different size and quality (large: ID >= 85%)
  sft.jsonl      {prompt, completion}                 every training problem with its worked solution
  prompts.jsonl  {prompt, answer, teacher_responses}  every training problem, with both teachers'
                                                      greedy worked solutions (RL and distillation)
  teacher_sft.jsonl {prompt, completion}              every teacher response of prompts.jsonl (the
                                                      SFT stage of the SFT-then-RL baseline)
  prefs.jsonl    {prompt, chosen, rejected}           pairs sampled from the base student
  test_id.jsonl, test_ood.jsonl  {prompt, answer}
"""

import json
import random
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
CHARS = "0123456789+-=;"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
TRAIN, TEST = 20000, 500  # training problems; test problems per split
MAX_NEW_TOKENS = 48  # the longest solution is 38 tokens and EOS
SLIP = 0.75  # the student learns from solutions that drop a carry or borrow this often
PREF_PROMPTS = 4000


def problem(rng, ood=False):
    """A prompt "37+5-8+9=": a start in 10..99 (in 70..79 exactly when ood), then 2-4 steps of +/- 1..9."""
    start = rng.randrange(70, 80) if ood else rng.choice([s for s in range(10, 100) if not 70 <= s <= 79])
    steps = [(rng.choice("+-"), rng.randrange(1, 10)) for _ in range(rng.randrange(2, 5))]
    return f"{start}" + "".join(f"{op}{x}" for op, x in steps) + "="


def solve(prompt, slip=0.0, rng=None):
    """The worked solution of a prompt: each step's running total, "37+5=42;42-8=34;34+9=43". With
    slip > 0, a carry or borrow into the tens (totals >= 0) is dropped with that probability and the
    chain goes on from the wrong total: "67+9=66;66-6=60" (the student's misconception)."""
    total, lines = int(prompt[:2]), []
    for op, x in zip(prompt[2:-1:2], prompt[3:-1:2]):
        new = total + int(x) if op == "+" else total - int(x)
        if slip and min(total, new) >= 0 and new // 10 != total // 10 and rng.random() < slip:
            new += -10 if op == "+" else 10  # the tens digit left as it was
        lines.append(f"{total}{op}{x}={new}")
        total = new
    return ";".join(lines)


def answer(prompt):
    return solve(prompt).rsplit("=", 1)[1]


def distinct(rng, n, seen, ood=False):
    """n problems not in `seen` (which they join)."""
    out = []
    while len(out) < n:
        p = problem(rng, ood)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


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
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(folder)


def sft(init, out, steps, seed, data=WORLD / "sft.jsonl"):
    """Train with the project's sft.py; returns its summary."""
    subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(init), "--out", str(out), "--steps", str(steps),
                    "--seed", str(seed), "--lr", "1e-3", "--batch-size", "64", "--micro-batch-size", "64",
                    "--warmup-steps", "50", "--max-new-tokens", str(MAX_NEW_TOKENS), "--data", str(data),
                    "--eval-data", str(WORLD / "test_id.jsonl"), "--ood-data", str(WORLD / "test_ood.jsonl")],
                   check=True)
    return json.loads((Path(out) / "summary.json").read_text())


@torch.no_grad()
def respond(folder, prompts, n, greedy, batch_size=512):
    """n responses per prompt from the model in `folder` (greedy, or sampled at temperature 1)."""
    d = Dist(0, 1, torch.device("cpu"))
    model, tok = load_model(folder, d, trainable=False), load_tokenizer(folder)
    out = []
    for chunk in micro_batches([p for p in prompts for _ in range(n)], batch_size):
        out += decode_responses(tok, sample(model, tok, [prompt_ids(tok, p) for p in chunk], d,
                                            max_new_tokens=MAX_NEW_TOKENS, greedy=greedy))
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def preference_pairs(prompts, samples):
    """From k sampled responses of the base student per prompt: rejected is the first wrong sample,
    chosen the first correct one, or the reference solution when none is correct. Prompts with no
    wrong sample are skipped."""
    pairs = []
    for p, group in zip(prompts, samples):
        right = [s for s in group if reward(s, answer(p))]
        wrong = [s for s in group if not reward(s, answer(p))]
        if wrong:
            pairs.append({"prompt": p, "chosen": right[0] if right else solve(p), "rejected": wrong[0]})
    return pairs


def teacher_sft_rows(prompt_rows):
    """SFT data from the teachers: one {prompt, completion} per teacher response of each prompt."""
    return [{"prompt": r["prompt"], "completion": t} for r in prompt_rows for t in r["teacher_responses"]]


def main():
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    seen = set()
    test = distinct(rng, TEST, seen)
    ood = distinct(rng, TEST, seen, ood=True)
    train = distinct(rng, TRAIN, seen)
    write_jsonl(WORLD / "test_id.jsonl", [{"prompt": p, "answer": answer(p)} for p in test])
    write_jsonl(WORLD / "test_ood.jsonl", [{"prompt": p, "answer": answer(p)} for p in ood])
    write_jsonl(WORLD / "sft.jsonl", [{"prompt": p, "completion": solve(p)} for p in train])

    results, vocab_size = {}, len(SPECIAL) + len(CHARS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # two teachers: a larger one trained longer (ID 94%, OOD 94%), a smaller one less (89%, 66%)
        for name, hidden, layers, steps, seed in [("teacher_large", 128, 4, 800, 1), ("teacher_small", 96, 4, 500, 2)]:
            make_init(tmp / name, vocab_size, hidden, layers, 4)
            results[name] = sft(tmp / name, tmp / f"{name}_run", steps, seed)
            shutil.rmtree(WORLD / name, ignore_errors=True)
            shutil.move(str(tmp / f"{name}_run" / "model"), str(WORLD / name))
        # The student: the small teacher re-taught by a sloppy tutor (solutions that drop SLIP of the
        # carries and borrows), so it is sure of most steps and wrong in one way that a reward, a
        # preference or a teacher can show it.
        write_jsonl(tmp / "sloppy.jsonl", [{"prompt": p, "completion": solve(p, SLIP, rng)} for p in train])
        results["student"] = sft(WORLD / "teacher_small", tmp / "student_run", 300, 3, tmp / "sloppy.jsonl")
        shutil.rmtree(WORLD / "student", ignore_errors=True)
        shutil.move(str(tmp / "student_run" / "model"), str(WORLD / "student"))
    for name, r in results.items():
        print(f"{name}: ID accuracy {r['accuracy_after']:.3f}, OOD accuracy {r['ood_accuracy_after']:.3f}")

    # RL / distillation prompts, with each teacher's greedy solution (raw: not filtered for correctness).
    large = respond(WORLD / "teacher_large", train, 1, greedy=True)
    small = respond(WORLD / "teacher_small", train, 1, greedy=True)
    prompt_rows = [{"prompt": p, "answer": answer(p), "teacher_responses": [a[0], b[0]]}
                   for p, a, b in zip(train, large, small)]
    write_jsonl(WORLD / "prompts.jsonl", prompt_rows)
    write_jsonl(WORLD / "teacher_sft.jsonl", teacher_sft_rows(prompt_rows))

    # Preference pairs from 8 samples of the base student per prompt.
    pairs = preference_pairs(train[:PREF_PROMPTS], respond(WORLD / "student", train[:PREF_PROMPTS], 8, greedy=False))
    write_jsonl(WORLD / "prefs.jsonl", pairs)
    print(f"{len(pairs)} preference pairs, {len(train)} RL prompts")
    assert 0.20 <= results["student"]["accuracy_after"] <= 0.45, "student accuracy out of range"
    assert results["teacher_large"]["accuracy_after"] >= 0.85 and results["teacher_large"]["ood_accuracy_after"] >= 0.5


if __name__ == "__main__":
    main()
