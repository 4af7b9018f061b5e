"""common.py (and the method files' batching) against naive references on a tiny random model."""

import re

import pytest
import torch

import common
import dpo
import sft

PROBLEMS = ["1+2=", "37+58=", "5-60=", "99+99=", "0-0=", "12-40=", "7+7=", "50-51="]


def solve(prompt):
    return str(eval(prompt[:-1]))


def naive_response_logprobs(model, batch):
    """(B, R) log-probs of the response tokens from the full (B, T, V) logits of the HF model,
    position ids counted by hand from each row's first real token."""
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["prompt_width"]
    B, T = ids.shape
    pos = torch.zeros_like(ids)
    for i in range(B):
        first = int(mask[i].nonzero()[0])
        pos[i, first:] = torch.arange(T - first)
    logits = model.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits, -1)
    # the token at column t is predicted by the logits at column t - 1
    out = logp[:, P - 1:-1].gather(-1, ids[:, P:, None]).squeeze(-1)
    return out * batch["response_mask"]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- log-probs

def test_pad_batch_layout(tok, cpu):
    prompts = [[1, 4, 5], [1, 6]]
    responses = [[7, 2], [8, 9, 10, 2]]
    b = common.pad_batch(prompts, responses, tok.pad_token_id, cpu.device)
    assert b["prompt_width"] == 3
    assert b["input_ids"].tolist() == [[1, 4, 5, 7, 2, 0, 0], [0, 1, 6, 8, 9, 10, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def _mixed_batch(tok, cpu):
    prompts = [common.prompt_ids(tok, p) for p in ["1+2=", "37+58=", "99-100=", "5-6="]]
    responses = [common.response_ids(tok, c) for c in ["3", "95", "-1", "-1234"]]
    return common.pad_batch(prompts, responses, tok.pad_token_id, cpu.device)


def test_chunked_logprobs_equal_full_logits(model, tok, cpu, monkeypatch):
    V = model.lm.get_output_embeddings().weight.shape[0]
    model.chunk_bytes = 4 * V * 3  # three rows of fp32 logits per chunk
    batch = _mixed_batch(tok, cpu)
    B, R = batch["response_mask"].shape
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1  # rows really are padded differently

    calls = []
    real = common._head_logprobs
    monkeypatch.setattr(common, "_head_logprobs", lambda h, *a: calls.append(h.shape[0]) or real(h, *a))
    with torch.no_grad():
        got = common.logprobs(model, batch)
        want = naive_response_logprobs(model, batch)
    assert calls == [3] * (B * R // 3) + ([B * R % 3] if B * R % 3 else [])  # several chunks, all rows
    assert got.shape == (B, R)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[batch["response_mask"] == 0] == 0).all()
    assert (got[batch["response_mask"] == 1] < 0).all()

    # and each row equals the same sequence run alone, with no padding at all
    with torch.no_grad():
        for i in range(B):
            keep = batch["attention_mask"][i].bool()
            ids = batch["input_ids"][i][keep][None]
            n_resp = int(batch["response_mask"][i].sum())
            alone = torch.log_softmax(model.lm(input_ids=ids).logits.float(), -1)[0, -n_resp - 1:-1]
            alone = alone.gather(-1, ids[0, -n_resp:, None]).squeeze(-1)
            torch.testing.assert_close(got[i, :n_resp], alone, atol=1e-5, rtol=1e-5)


def test_reference_logprobs_are_the_plain_computation(model, tok, cpu):
    """common.reference_logprobs (what the load-time probe trusts) is the model's own log_softmax at
    the response tokens, position ids as counted by hand; logprobs() equals it, gradients included."""
    batch = _mixed_batch(tok, cpu)
    reference = common.reference_logprobs(model, batch)
    torch.testing.assert_close(reference, naive_response_logprobs(model, batch), atol=1e-6, rtol=1e-6)
    fast = common.logprobs(model, batch)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    reference.sum().backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    fast.sum().backward()
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4)


def test_chunked_logprobs_gradients_equal_full_logits(model, tok, cpu):
    V = model.lm.get_output_embeddings().weight.shape[0]
    model.chunk_bytes = 4 * V * 3
    batch = _mixed_batch(tok, cpu)

    common.logprobs(model, batch).sum().backward()
    chunked = _grads(model)
    model.zero_grad(set_to_none=True)
    naive_response_logprobs(model, batch).sum().backward()
    full = _grads(model)

    names = {n for n, _ in model.named_parameters()}
    assert chunked.keys() == full.keys() == names  # every parameter gets a gradient, head included
    for n in names:
        assert full[n].abs().sum() > 0, n
        torch.testing.assert_close(chunked[n], full[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_logprob_extras_equal_full_logits(model, tok, cpu):
    """gather / topk / entropy come from the same chunked logits and match a full log_softmax; topk and
    entropy carry no gradient, gather_logp carries the full forward's (TrOPD trains its outlier KL through it);
    the main log-probs (and their gradient) are unchanged."""
    V = model.lm.get_output_embeddings().weight.shape[0]
    model.chunk_bytes = 4 * V * 3
    batch = _mixed_batch(tok, cpu)
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["prompt_width"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = torch.log_softmax(model.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(),
                                 -1)[:, P - 1:-1]                                      # (B, R, V)
    B, R = batch["response_mask"].shape
    gather = torch.randint(0, V, (B, R, 5), generator=torch.Generator().manual_seed(0))
    out = model(ids, mask, P, gather=gather, topk=4, entropy=True)
    assert out["gather_logp"].shape == (B, R, 5) and out["topk_ids"].shape == (B, R, 4)
    torch.testing.assert_close(out["gather_logp"], full.gather(-1, gather), atol=1e-5, rtol=1e-5)
    values, indices = full.topk(4, -1)
    torch.testing.assert_close(out["topk_logp"], values, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["topk_ids"], indices)
    torch.testing.assert_close(out["entropy"], -(full.exp() * full).sum(-1), atol=1e-5, rtol=1e-5)
    for k in ("topk_logp", "entropy"):
        assert not out[k].requires_grad, k
    out["gather_logp"].sum().backward()
    chunked = _grads(model)
    model.zero_grad(set_to_none=True)
    naive = torch.log_softmax(model.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(), -1)
    naive[:, P - 1:-1].gather(-1, gather).sum().backward()
    for n, g in _grads(model).items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(chunked[n], g, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, P, gather=gather, topk=4, entropy=True)
    plain = model(ids, mask, P)
    torch.testing.assert_close(out["logp"], plain)
    (out["logp"] * batch["response_mask"]).sum().backward()
    with_extras = _grads(model)
    model.zero_grad(set_to_none=True)
    common.logprobs(model, batch).sum().backward()
    for n, g in _grads(model).items():
        torch.testing.assert_close(with_extras[n], g, msg=n)


def test_check_same_tokenizer(tiny_model_dir, tmp_path):
    from world.build import make_tokenizer
    a = common.load_tokenizer(tiny_model_dir)
    common.check_same_tokenizer(a, common.load_tokenizer(tiny_model_dir), "t")
    other = tmp_path / "other"
    other.mkdir()
    make_tokenizer(other)
    b = common.load_tokenizer(other)
    b.add_tokens(["*"])
    with pytest.raises(common.UserError, match="different tokenizer"):
        common.check_same_tokenizer(a, b, "t")


# ----------------------------------------------------------------------------- sampling

def test_sample_logprobs_match_recomputed(model, tok, cpu):
    model.eval()
    prompts = [common.prompt_ids(tok, p) for p in PROBLEMS]
    assert len(set(map(len, prompts))) > 1
    torch.manual_seed(0)
    out = common.sample(model, tok, prompts, cpu, max_new_tokens=8)
    P = out["prompt_width"]
    B, R = out["response_mask"].shape
    assert B == len(prompts) and out["input_ids"].shape == (B, P + R) and out["logp"].shape == (B, R)

    # the prompts are left-padded as pad_batch does it
    for i, p in enumerate(prompts):
        assert out["input_ids"][i, P - len(p):P].tolist() == p
        assert (out["input_ids"][i, :P - len(p)] == tok.pad_token_id).all()
        assert out["attention_mask"][i, :P].tolist() == [0] * (P - len(p)) + [1] * len(p)

    # response_mask: 1 up to and including the first EOS, 0 after (and pad ids there)
    response = out["input_ids"][:, P:]
    eos = tok.eos_token_id
    stopped = 0
    for i in range(B):
        hits = (response[i] == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else R
        stopped += n < R
        assert out["response_mask"][i].tolist() == [1.0] * n + [0.0] * (R - n)
        assert (response[i, n:] == tok.pad_token_id).all()
        assert (out["logp"][i, n:] == 0).all()
    assert stopped >= 1, "no row stopped at EOS early: the mask test would be vacuous"
    assert (out["attention_mask"][:, P:] == out["response_mask"]).all()

    with torch.no_grad():
        again = common.logprobs(model, out)
    m = out["response_mask"].bool()
    torch.testing.assert_close(out["logp"][m], again[m], atol=1e-4, rtol=1e-4)
    assert (out["logp"][m] < 0).all()


def test_sample_records_topk_of_the_sampling_distribution(model, tok, cpu):
    model.eval()
    prompts = [common.prompt_ids(tok, p) for p in PROBLEMS[:5]]
    torch.manual_seed(0)
    out = common.sample(model, tok, prompts, cpu, max_new_tokens=6, temperature=0.7, topk=3)
    B, R = out["response_mask"].shape
    assert out["topk_ids"].shape == out["topk_logp"].shape == (B, R, 3)
    P = out["prompt_width"]
    with torch.no_grad():
        pos = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model.lm(input_ids=out["input_ids"], attention_mask=out["attention_mask"], position_ids=pos).logits
    want = torch.log_softmax(logits[:, P - 1:-1].float() / 0.7, -1).topk(3, -1)
    m = out["response_mask"].bool()
    torch.testing.assert_close(out["topk_logp"][m], want.values[m], atol=1e-4, rtol=1e-4)
    assert torch.equal(out["topk_ids"][m], want.indices[m])


def test_inverse_cdf_sampling_frequencies():
    """Tokens are drawn with the right probabilities from the given uniforms."""
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    logp = probs.log().expand(40000, 4)
    torch.manual_seed(0)
    draws = common._inverse_cdf(logp, torch.rand(40000))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[1] == 0


def test_sample_splits_the_global_batch_over_processes(model, tok, cpu, monkeypatch):
    """Every process draws the uniforms of the whole global batch and uses its own block, so ranks 0
    and 1 of 2 sample exactly the rows of a one-process run (what makes RL runs match on 1 and N
    processes; the collectives are identities here, each rank then decodes to its own longest row)."""
    prompts = [common.prompt_ids(tok, p) for p in PROBLEMS]
    torch.manual_seed(3)
    one = common.sample(model, tok, prompts, cpu, 6)
    monkeypatch.setattr(common, "all_sum", lambda x, d, op=None: torch.as_tensor(x, dtype=torch.float64).clone())
    for rank in (0, 1):
        torch.manual_seed(3)
        half = common.sample(model, tok, prompts[rank * 4:(rank + 1) * 4], common.Dist(rank, 2, cpu.device), 6)
        R, rows = half["response_mask"].shape[1], slice(rank * 4, (rank + 1) * 4)
        assert torch.equal(half["input_ids"][:, half["prompt_width"]:], one["input_ids"][rows, one["prompt_width"]:][:, :R])
        assert torch.equal(half["response_mask"], one["response_mask"][rows, :R])
        assert one["response_mask"][rows, R:].sum() == 0


def test_sample_same_responses_in_micro_batches_and_with_rare_checks(model, tok, cpu):
    """Generation in micro-batches (a bound on the KV cache) and with the all-ended check every few
    tokens (no host sync per token) samples exactly the responses of one batch checked every token,
    records the same log-probs (to float rounding) and leaves the RNG where it would have left it."""
    prompts = [common.prompt_ids(tok, p) for p in PROBLEMS * 3] + [common.prompt_ids(tok, "1")]
    torch.manual_seed(7)
    want, after = common.sample(model, tok, prompts, cpu, 6, topk=3), torch.rand(4)
    for kw in ({"check_every": 4}, {"micro_batch_size": 5}, {"micro_batch_size": 4, "check_every": 3}):
        torch.manual_seed(7)
        got = common.sample(model, tok, prompts, cpu, 6, topk=3, **kw)
        assert torch.equal(torch.rand(4), after), kw  # the next draws do not depend on how it decoded
        for k in ("input_ids", "attention_mask", "response_mask", "truncated"):
            assert torch.equal(got[k], want[k]), (kw, k)
        valid = want["response_mask"].bool()
        assert torch.equal(got["topk_ids"][valid], want["topk_ids"][valid])
        torch.testing.assert_close(got["logp"], want["logp"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["topk_logp"][valid], want["topk_logp"][valid], atol=1e-5, rtol=0)


def test_sample_greedy_is_deterministic_argmax(model, tok, cpu):
    model.eval()
    prompts = [common.prompt_ids(tok, p) for p in PROBLEMS[:5]]
    torch.manual_seed(1)
    a = common.sample(model, tok, prompts, cpu, max_new_tokens=6, greedy=True)
    torch.manual_seed(2)
    b = common.sample(model, tok, prompts, cpu, max_new_tokens=6, greedy=True)
    for k in ("input_ids", "attention_mask", "response_mask", "logp"):
        assert torch.equal(a[k], b[k]), k
    # each greedy token is the argmax of the full-forward distribution at its position
    P = a["prompt_width"]
    with torch.no_grad():
        pos = (a["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model.lm(input_ids=a["input_ids"], attention_mask=a["attention_mask"], position_ids=pos).logits
    best = logits[:, P - 1:-1].argmax(-1)
    m = a["response_mask"].bool()
    assert torch.equal(best[m], a["input_ids"][:, P:][m])


# ----------------------------------------------------------------------------- DPO batching

PAIRS = [{"prompt": "12+3=", "chosen": "15", "rejected": "9"},
         {"prompt": "7-58=", "chosen": "-51", "rejected": "1234"},
         {"prompt": "99+99=", "chosen": "198", "rejected": "-2"}]


def test_concatenated_logps_equal_separate_forwards(model, tok, cpu):
    batch = dpo.encode_pairs(tok, PAIRS, cpu.device)
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS)
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_logps(model, batch)
        sep = {}
        for key in ("chosen", "rejected"):
            b = common.pad_batch([common.prompt_ids(tok, r["prompt"]) for r in PAIRS],
                                 [common.response_ids(tok, r[key]) for r in PAIRS], tok.pad_token_id, cpu.device)
            sep[key] = common.logprobs(model, b).sum(-1)
    assert chosen.shape == rejected.shape == (len(PAIRS),)
    torch.testing.assert_close(chosen, sep["chosen"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, sep["rejected"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(chosen, rejected)  # the halves are really different sequences


# ----------------------------------------------------------------------------- SFT accumulation

def test_micro_batch_accumulation_equals_one_batch(model, tok, cpu):
    prompts = [common.prompt_ids(tok, p) for p in PROBLEMS]
    completions = [common.response_ids(tok, solve(p)) for p in PROBLEMS]
    n_tokens = sum(map(len, completions))

    full = common.pad_batch(prompts, completions, tok.pad_token_id, cpu.device)
    loss_full = sft.sft_loss(common.logprobs(model, full), full["response_mask"], n_tokens)
    loss_full.backward()
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)

    loss_sum = 0.0
    for mb in common.micro_batches(list(range(len(PROBLEMS))), 2):
        b = common.pad_batch([prompts[i] for i in mb], [completions[i] for i in mb], tok.pad_token_id, cpu.device)
        loss = sft.sft_loss(common.logprobs(model, b), b["response_mask"], n_tokens)
        loss.backward()  # accumulates into .grad
        loss_sum += loss.item()
    g_acc = _grads(model)

    assert loss_sum == pytest.approx(loss_full.item(), rel=1e-5)
    assert g_full.keys() == g_acc.keys() and len(g_full) == len(list(model.parameters()))
    for n in g_full:
        torch.testing.assert_close(g_acc[n], g_full[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(tiny_model_dir):
    """Text -> ids -> text through the scripts' loader, for a prompt and a worked solution, on the
    tokenizer every model folder of the world has."""
    tok = common.load_tokenizer(tiny_model_dir)
    for folder in ("student", "teacher_large", "teacher_small"):
        assert common.load_tokenizer(common.WORLD / folder).get_vocab() == tok.get_vocab()
    ids = tok("37-58=").input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len("37-58=")  # character level
    assert tok.decode(ids, skip_special_tokens=True) == "37-58="
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert common.prompt_ids(tok, "37-58=") == ids
    r = common.response_ids(tok, "37+5=42;42-8=34;34-9=25")
    assert r[-1] == tok.eos_token_id and tok.bos_token_id not in r and len(r) == 24
    assert tok.decode(r, skip_special_tokens=True) == "37+5=42;42-8=34;34-9=25"


# ----------------------------------------------------------------------------- rewards

@pytest.mark.parametrize("response, answer, expected", [
    ("95", "95", 1.0),
    ("-28", "-28", 1.0),
    ("the answer is 1,234", "1234", 1.0),
    ("12 then 13", "12", 0.0),   # the last number counts
    ("12 then 13", "13", 1.0),
    ("", "5", 0.0),
    ("no digits", "5", 0.0),
    ("28", "-28", 0.0),
    ("95", 95, 1.0),             # answers may be JSON numbers
])
def test_reward(response, answer, expected):
    assert common.reward(response, answer) == expected


def test_extract_answer():
    assert common.extract_answer("95") == "95"
    assert common.extract_answer("-28") == "-28"
    assert common.extract_answer("the answer is 1,234") == "1234"
    assert common.extract_answer("12 then 13") == "13"
    assert common.extract_answer("") is None


# ----------------------------------------------------------------------------- data errors

def test_read_jsonl_ok(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4", "x": 1}\n')
    rows = common.read_jsonl(p, ("prompt", "answer"))
    assert [r["answer"] for r in rows] == ["2", "4"]


def test_read_jsonl_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(common.UserError, match=re.escape(str(p))):
        common.read_jsonl(p, ("prompt",))


def test_read_jsonl_malformed_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    with pytest.raises(common.UserError) as e:
        common.read_jsonl(p, ("prompt", "answer"))
    assert str(p) in str(e.value) and "line 2" in str(e.value)


def test_read_jsonl_missing_field(tmp_path):
    p = tmp_path / "field.jsonl"
    p.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                 '{"prompt": "1+1=", "chosen": "2"}\n')
    with pytest.raises(common.UserError) as e:
        common.read_jsonl(p, ("prompt", "chosen", "rejected"))
    assert "'rejected'" in str(e.value) and "line 2" in str(e.value) and str(p) in str(e.value)


def test_read_jsonl_not_an_object_and_empty(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text('[1, 2]\n')
    with pytest.raises(common.UserError, match="line 1"):
        common.read_jsonl(p, ("prompt",))
    q = tmp_path / "empty.jsonl"
    q.write_text("\n\n")
    with pytest.raises(common.UserError, match="no records"):
        common.read_jsonl(q, ("prompt",))


# ----------------------------------------------------------------------------- arguments

def test_parse_args_values():
    a = common.parse_args(dpo.Args, ["--beta", "0.5", "--no-gradient-checkpointing", "--steps", "3",
                                     "--micro-batch-size", "8", "--out", "x/y"])
    assert isinstance(a, dpo.Args)
    assert a.beta == 0.5 and isinstance(a.beta, float)
    assert a.gradient_checkpointing is False
    assert a.steps == 3 and isinstance(a.steps, int)
    assert a.micro_batch_size == 8 and a.out == "x/y"
    assert a.lr == dpo.Args.lr  # untouched fields keep their defaults
    assert common.parse_args(dpo.Args, ["--gradient-checkpointing"]).gradient_checkpointing is True
    assert common.parse_args(sft.Args, []) == sft.Args()


def test_parse_args_rejects_bad_values():
    """argparse's own errors become one-line UserErrors (exit 1), like every other bad input."""
    with pytest.raises(common.UserError, match="--steps: invalid int value: 'many'"):
        common.parse_args(dpo.Args, ["--steps", "many"])
    with pytest.raises(common.UserError, match="unrecognized arguments: --no-such-flag"):
        common.parse_args(dpo.Args, ["--no-such-flag"])


def test_parse_args_choices_from_literal_and_old_spellings():
    """A Literal[...] field takes only its values, checked by parse_args (one line, the values named);
    a flag's older spelling (Args.aliases) still works."""
    import dppo
    a = common.parse_args(dppo.Args, ["--trust-region", "clip", "--topk", "5"])
    assert (a.trust_region, a.top_k) == ("clip", 5)
    assert common.parse_args(dppo.Args, ["--top-k", "7"]).top_k == 7
    with pytest.raises(common.UserError, match="--trust-region must be one of dppo, clip, not 'ppo'"):
        common.parse_args(dppo.Args, ["--trust-region", "ppo"])
    with pytest.raises(common.UserError, match="--divergence must be one of binary_tv, binary_kl, topk_tv, topk_kl"):
        common.parse_args(dppo.Args, ["--divergence", "tv"])


def test_parse_args_help_from_docstrings(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        common.parse_args(dpo.Args, ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "DPO beta: the weight of the implicit reward" in text
    assert "--beta" in text and "--no-gradient-checkpointing" in text
    assert "recompute decoder-layer activations" in text
    assert text.count("Direct Preference Optimization") == 1  # the description: the module's first line


# ----------------------------------------------------------------------------- data order

def test_batches_deterministic_and_cover_each_epoch():
    n, B, steps = 10, 4, 5  # 20 indices: two epochs, batches straddle the epoch boundary
    a = common.batches(n, B, steps, seed=3)
    assert a == common.batches(n, B, steps, seed=3)
    assert a != common.batches(n, B, steps, seed=4)
    assert len(a) == steps and all(len(b) == B for b in a)
    order = [i for b in a for i in b]
    for e in range(steps * B // n):
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # reshuffled each epoch


def test_batches_partial_last_epoch():
    a = common.batches(7, 3, 4, seed=0)  # 12 indices: one full epoch, then 5 of the next
    order = [i for b in a for i in b]
    assert sorted(order[:7]) == list(range(7))
    assert len(set(order[7:])) == 5  # no repeats inside the second epoch



GATHER_COUNT = r'''
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist, common
from types import SimpleNamespace


def main():
    d = common.init_distributed(2)
    model = common.shard_model(common.load_model(sys.argv[2], d), d)
    calls = []
    for name in ("all_gather_single", "all_gather_into_tensor"):  # what FSDP2 gathers with (its name in torch 2.13, before)
        if hasattr(dist, name):
            setattr(dist, name, lambda *a, real=getattr(dist, name), **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    out = common.sample(model, SimpleNamespace(pad_token_id=0, eos_token_id=-1), [[1, 2, 3]] * 2, d, int(sys.argv[3]))
    assert out["input_ids"].shape[1] == 3 + int(sys.argv[3])
    if d.main:
        print("gathers", len(calls), flush=True)
    dist.barrier()  # both processes finish their pending gathers before run() tears gloo down


common.run(main)  # (which leaves a multi-process run without the interpreter's teardown, where gloo could abort)
'''


def test_generation_gathers_the_sharded_weights_once(tiny_model_dir, tmp_path):
    """Under FSDP (2 gloo processes) a generation all-gathers each unit's weights once, however many
    tokens it decodes, not once per token and layer."""
    import subprocess
    import sys
    script = tmp_path / "count.py"
    script.write_text(GATHER_COUNT)
    counts = []
    for n in (2, 12):
        proc = subprocess.run([sys.executable, str(script), str(common.WORLD.parent), str(tiny_model_dir), str(n)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(int(proc.stdout.split("gathers")[1]))
    units = 2 + 1  # the tiny model's two decoder layers and the root
    assert counts == [units, units]


def test_library_warnings_fail_the_tests():
    """CI's guard against the next API change: a deprecation or future warning raised inside a script
    a test runs ends it with an error, as it does in the tests' own process."""
    import subprocess
    import sys
    import warnings
    for category in ("DeprecationWarning", "FutureWarning"):
        proc = subprocess.run([sys.executable, "-c", f"import warnings; warnings.warn('old', {category})"],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and category in proc.stderr
    with pytest.raises(FutureWarning):
        warnings.warn("old", FutureWarning)
