"""Build the embedded tiny world, deterministically (seeded), with the project's own sft.py:

    python world/build.py            # about 10 minutes on 2 CPU cores

The task: integer addition and subtraction, "37+58=" -> "95", "12-40=" -> "-28".
  in-distribution (ID): two operands in 0..99, + or -; 500 held-out test problems
  out-of-distribution (OOD): see OOD below; 500 test problems, never trained on
Writes into world/:
  tokenizer + student/            base student (SFT'd briefly: ID accuracy between 15% and 60%)
  teacher_large/, teacher_small/  two teachers of different size and seed (ID accuracy >= 85%)
  sft.jsonl      {prompt, completion}                 every training problem with its answer
  prompts.jsonl  {prompt, answer, teacher_responses}  every training problem, with both teachers'
                                                      greedy responses (RL and distillation)
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
CHARS = "0123456789+-="
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def id_problems():
    return [f"{a}{op}{b}=" for a in range(100) for b in range(100) for op in "+-"]


def ood_problems(rng, n):
    """OOD: three operands (a op b op c, each 0..99): an operation mix never trained on."""
    out = set()
    while len(out) < n:
        a, b, c = (rng.randrange(100) for _ in range(3))
        out.add(f"{a}{rng.choice('+-')}{b}{rng.choice('+-')}{c}=")
    return sorted(out)


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


def sft(init, out, steps, seed, lr):
    subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(init), "--out", str(out),
                    "--steps", str(steps), "--seed", str(seed), "--lr", str(lr), "--batch-size", "128",
                    "--micro-batch-size", "128", "--warmup-steps", "50",
                    "--data", str(WORLD / "sft.jsonl")], check=True)
    return json.loads((Path(out) / "summary.json").read_text())


if __name__ == "__main__":
    print("probe only")
