"""Every method script on a model that is not the tiny world's, and on the GPU dtype policy:
a GPT-2 student with a byte-level BPE tokenizer, a ChatML chat template and conversational JSONL;
the tiny world under bf16 (frozen models in bf16, the trained model under CPU bf16 autocast);
answer formats; the truncation warning; default flags on 2 processes."""

import json

import pytest
import torch

import common
from test_scripts import ok, run, summary, metrics

SCRIPTS = ["sft.py", "dpo.py", "ppo.py", "grpo.py", "dppo.py", "dypo.py", "opd.py", "opd_plus.py", "tropd.py"]
SAMPLING = {"ppo.py", "grpo.py", "dppo.py", "dypo.py", "opd.py", "opd_plus.py", "tropd.py"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def batch_flags(script):
    """Small batches for a 2-step run; --micro-batch-size is left at its default (larger than the batch)."""
    if script in ("sft.py", "dpo.py"):
        return ["--batch-size", 4]
    return ["--prompts-per-step", 4, "--group-size", 2]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gpt2_world(tmp_path_factory):
    """A GPT-2 (dropout 0.1 in its config) with a byte-level BPE tokenizer trained here, ChatML chat
    template and <|im_end|> as EOS, and conversational JSONL for every script."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("gpt2_world")
    folder = root / "model"
    problems = [(a, b) for a in range(0, 40, 3) for b in range(0, 40, 7)]
    corpus = [f"<|im_start|>user\nWhat is {a} plus {b}?<|im_end|>\n<|im_start|>assistant\n{a + b}" for a, b in problems]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)

    def chat(a, b):
        return [{"role": "system", "content": "You add."}, {"role": "user", "content": f"What is {a} plus {b}?"}]
    rows = [dict(prompt=chat(a, b), answer=a + b, completion=[{"role": "assistant", "content": str(a + b)}],
                 chosen=str(a + b), rejected=[{"role": "assistant", "content": str(a + b + 1)}],
                 teacher_responses=[f"The sum is {a + b}.", str(a + b)]) for a, b in problems]
    return dict(model=folder, data=write_jsonl(root / "train.jsonl", rows),
                eval=write_jsonl(root / "eval.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:6]]))


def test_gpt2_bpe_chatml_round_trip(gpt2_world):
    """The loader the scripts use keeps the custom byte-level BPE and its chat template."""
    tok = common.load_tokenizer(gpt2_world["model"])
    text = "What is 12 plus 30? Ünïcode too"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    ids = common.prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert common.response_ids(tok, "42")[-1] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_on_gpt2_chatml(script, gpt2_world, tmp_path):
    out = tmp_path / "run"
    teacher = ["--teacher", gpt2_world["model"]] if script.startswith(("opd", "tropd")) else []
    proc = ok(run(script, "--model", gpt2_world["model"], "--data", gpt2_world["data"], *teacher,
                  "--eval-data", gpt2_world["eval"], "--ood-data", gpt2_world["eval"], "--steps", 2,
                  "--max-new-tokens", 4, *batch_flags(script), "--out", out))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    s = summary(out)
    # a random GPT-2 does not say <|im_end|> within 4 tokens: the truncation is reported, and warned of once
    assert s["truncated_before"] > 0.5
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:") and "--max-new-tokens 4" in line]
    assert len(warnings) == 1, proc.stdout[-3000:]
    if script in SAMPLING:
        assert all(m["rollout/truncated"] > 0.5 for m in metrics(out))
    if script == "dpo.py":  # dropout off: the first step's policy equals its reference exactly
        first = metrics(out)[0]
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0 and first["train/loss"] == pytest.approx(0.6931, abs=1e-4)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    rows = [json.loads(line) for line in (common.WORLD / "test_id.jsonl").read_text().splitlines()[:16]]
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", rows)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_under_the_gpu_dtype_policy(script, small_eval, tmp_path):
    """Two steps on the tiny world with frozen models in bf16 and the trained model's forward under
    bf16 autocast, on CPU: a dtype mismatch a GPU would hit fails here."""
    out = tmp_path / "run"
    ok(run(script, "--steps", 2, *batch_flags(script), "--eval-data", small_eval, "--ood-data", small_eval,
           "--out", out, env={common.BF16_ON_CPU: "1"}))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics(out))


def test_default_micro_batch_on_two_processes(small_eval, tmp_path):
    """`--gpus 2` with the default --micro-batch-size (64 > a process's 32 pairs) runs, and says so."""
    proc = ok(run("dpo.py", "--gpus", 2, "--steps", 1, "--eval-data", small_eval, "--ood-data", small_eval,
                  "--out", tmp_path / "run"))
    assert "using 32" in proc.stdout and "2 process(es) x 1 micro-batch(es) x 32" in proc.stdout


def test_micro_batch_lowered_to_the_share():
    two = common.Dist(0, 2, torch.device("cpu"))
    assert common.check_divisible(64, 64, two) == 32 and common.check_divisible(64, 8, two) == 8
    with pytest.raises(common.UserError, match="per-process batch 32 does not divide by --micro-batch-size 12"):
        common.check_divisible(64, 12, two)


@pytest.mark.parametrize("response, answer, expected", [
    ("so the answer is \\boxed{42}. Check: 7", "42", 1.0),      # the last \boxed, not the last number
    ("\\boxed{1} then \\boxed{2}", 2, 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),               # nested braces, compared as text
    ("\\boxed{1,000}", 1000, 1.0),
    ("48/2 = 24 apples, plus 48 = 72.\n#### 72", "72", 1.0),     # GSM8K: the number after ####
    ("#### 1,234 (check: 5)", 1234, 1.0),
    ("Natalia sold 48 + 24 = 72 clips", "72", 1.0),             # else the last number
    ("It is 72. Then 3", "72", 0.0),
    ("no number", "1", 0.0),
    ("72", "She sold 48/2 = 24 in May.\n#### 72", 1.0),         # a GSM8K-style reference solution
    ("\\boxed{5}", "The answer is $\\boxed{5}$", 1.0),          # a MATH-style reference solution
])
def test_answer_formats(response, answer, expected):
    assert common.reward(response, answer) == expected
