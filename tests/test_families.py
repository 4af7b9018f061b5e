"""Any decoder family transformers ships: the project's log-probs are the model's own.

For each family a tiny random model (hidden 32, 2 layers) with its special settings away from their
defaults (logit soft-caps, logit scales and multipliers, dropout 0.1) is built offline, and checked:
the chunked head's log-probs in train mode equal log_softmax of the model's own logits (a fresh
from_pretrained, eval mode) on a left-padded batch; sampling records those same log-probs; backward
reaches the weights; the saved checkpoint reloads with from_pretrained to the same log-probs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import common
from world.build import make_tokenizer

# the shared shape, then each family's own settings (non-default wherever the family has one)
BASE = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
SOFTCAP = dict(head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0, query_pre_attn_scalar=8,
               sliding_window=8, attention_dropout=0.1)
FAMILIES = {
    "llama": dict(attention_dropout=0.1, attention_bias=True),
    "qwen2": dict(attention_dropout=0.1),
    "qwen3": dict(attention_dropout=0.1, head_dim=8),
    "qwen3_moe": dict(attention_dropout=0.1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mistral": dict(attention_dropout=0.1, sliding_window=8),
    "mixtral": dict(attention_dropout=0.1, num_local_experts=4, num_experts_per_tok=2),
    "gemma": dict(attention_dropout=0.1, head_dim=8),
    "gemma2": SOFTCAP,
    "gemma3_text": SOFTCAP,
    "phi": dict(resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1, partial_rotary_factor=0.5),
    "phi3": dict(resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1),
    "gpt2": GPT,
    "gpt_bigcode": GPT,
    "gptj": dict(GPT, rotary_dim=4),
    "gpt_neox": dict(attention_dropout=0.1, hidden_dropout=0.1, rotary_pct=0.5),
    "falcon": dict(attention_dropout=0.1, hidden_dropout=0.1, new_decoder_architecture=True, num_kv_heads=2),
    "olmo": dict(attention_dropout=0.1),
    "olmo2": dict(attention_dropout=0.1),
    "granite": dict(attention_dropout=0.1, logits_scaling=0.5, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=0.5, embedding_multiplier=3.0),
    "cohere": dict(attention_dropout=0.1, logit_scale=0.25),
    "cohere2": dict(attention_dropout=0.1, logit_scale=0.25, sliding_window=8),
    "smollm3": dict(attention_dropout=0.1),
    "starcoder2": dict(attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1),
    "stablelm": dict(attention_dropout=0.1, hidden_dropout=0.1),
    "opt": dict(ffn_dim=64, dropout=0.1, attention_dropout=0.1, word_embed_proj_dim=32),
    "bloom": dict(n_layer=2, n_head=4, hidden_dropout=0.1, attention_dropout=0.1),
}
CPU = common.Dist(0, 1, torch.device("cpu"))


def build_family(folder, family, **overrides):
    """A tiny random `family` model with the world's character tokenizer, saved to `folder`. The
    weights are larger than the default init (std 0.02), so predictions are sharp and position
    dependent and a wrong transform, mask or position shows in the log-probs."""
    make_tokenizer(folder)
    config = AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **overrides})
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6 / p.shape[-1] ** 0.5 * (4 if "embed" in name or "wte" in name else 1))
            elif "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    lm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, build_family(tmp_path_factory.mktemp(request.param), request.param)


def left_padded_batch(tok):
    """Prompts of different lengths (left-padded) and responses of different lengths (right-padded)."""
    prompts = [tok(p).input_ids for p in ("12+34=", "5-6=", "77+1=")]
    responses = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in ("46", "-1", "78")]
    responses[1] = responses[1][:1]  # one response without EOS, shorter
    return common.pad_batch(prompts, responses, tok.pad_token_id, torch.device("cpu"))


def model_logprobs(lm, batch):
    """The truth: log_softmax of the model's own logits at the response tokens, (B, R), zero on padding."""
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["prompt_width"]
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp = logits.float().log_softmax(-1)[:, P - 1:-1].gather(-1, ids[:, P:, None]).squeeze(-1)
    return logp * batch["response_mask"]


def test_family(family_dir, tmp_path):
    family, folder = family_dir
    tok = common.load_tokenizer(folder)
    assert tok.decode(tok("12+34=").input_ids, skip_special_tokens=True) == "12+34="  # the loader's round trip
    batch = left_padded_batch(tok)
    truth = model_logprobs(AutoModelForCausalLM.from_pretrained(folder).eval(), batch)
    assert truth[batch["response_mask"].bool()].std() > 0.3, "the test model is too flat to bite"

    model = common.load_model(folder, CPU)  # the project's loader: dropout off, logit transform, probe
    model.train()
    ours = common.logprobs(model, batch)
    torch.testing.assert_close(ours, truth, atol=1e-4, rtol=0)
    torch.testing.assert_close(common.logprobs(model, batch), ours, atol=0, rtol=0)  # no dropout in train mode

    # sampling (KV cache, the model's own forward) records the log-probs the chunked head computes
    torch.manual_seed(0)
    rollout = common.sample(model, tok, [tok(p).input_ids for p in ("3+4=", "60-7=")], CPU, 6)
    with torch.no_grad():
        rescored = common.logprobs(model, rollout)
    torch.testing.assert_close(rescored, rollout["logp"], atol=1e-4, rtol=0)

    # backward reaches the weights
    (-common.logprobs(model, batch).sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert sum(g is not None and g.abs().sum() > 0 for g in grads.values()) >= 0.8 * len(grads)  # (unused experts)

    # the checkpoint reloads with from_pretrained and gives the same log-probs
    common.save_checkpoint(model, tok, tmp_path / "ckpt", CPU)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(model_logprobs(reloaded, batch), ours, atol=1e-5, rtol=0)


def test_logit_transforms_are_not_identity():
    """The families whose logits are not lm_head(h) are the ones the table knows."""
    def transform(family):
        return common.logit_transform(AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]}))
    assert transform("gemma2") == transform("gemma3_text") == (1.0, 3.0)
    assert transform("granite") == transform("granitemoe") == (2.0, None)
    assert transform("cohere") == transform("cohere2") == (0.25, None)
    assert transform("llama") == transform("gpt2") == (1.0, None)


def test_probe_stops_a_model_whose_logits_it_cannot_reproduce(tmp_path, monkeypatch):
    """A family with a transform the table does not know (simulated: Gemma 2 with the soft-cap
    forgotten) stops at load with one line naming the family."""
    folder = build_family(tmp_path / "g2", "gemma2")
    monkeypatch.setattr(common, "logit_transform", lambda config: (1.0, None))
    with pytest.raises(common.UserError, match="model family 'gemma2'.*differ from the model's own forward"):
        common.load_model(folder, CPU)


def test_dropout_is_off_in_every_loaded_model(tmp_path):
    folder = build_family(tmp_path / "gpt2", "gpt2")
    for trainable in (True, False):
        model = common.load_model(folder, CPU, trainable=trainable)
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert model.lm.config.resid_pdrop == model.lm.config.attn_pdrop == model.lm.config.embd_pdrop == 0


@pytest.mark.parametrize("family", ["gpt2", "falcon", "gpt_neox", "llama"])
def test_decoder_layers_found_for_any_layout(family):
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]}))
    layers = common.decoder_layers(lm)
    assert len(layers) == 2 and all(type(m).__name__ in lm._no_split_modules for m in layers)


# ----------------------------------------------------------------------------- several processes

def run_script(script, *args, env=None):
    return subprocess.run([sys.executable, str(common.WORLD.parent / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=common.WORLD.parent,
                          env={k: v for k, v in {**os.environ, **(env or {})}.items() if k != "RANK"})


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_two_processes_match_one(family, tmp_path):
    """FSDP2 over a GPT-2 layout (blocks in .h) and a soft-capped Gemma 2: 2 gloo processes give the
    losses and weights of 1 process."""
    folder = build_family(tmp_path / family, family)
    small = tmp_path / "test.jsonl"
    small.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": 2 * a}) + "\n" for a in range(8)))
    flags = ["--model", folder, "--steps", 3, "--batch-size", 16, "--micro-batch-size", 4, "--lr", 1e-3,
             "--eval-data", small, "--ood-data", small]
    for n in (1, 2):
        proc = run_script("sft.py", *flags, "--gpus", n, "--out", tmp_path / str(n))
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([json.loads(x)["train/loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                for n in ("1", "2"))
    assert one == pytest.approx(two, abs=1e-4)
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("1", "2"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)
