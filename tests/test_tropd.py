"""tropd.py: trust mask, prefix schedule, top-K forward KL and the loss against naive references;
end-to-end runs."""

import json
import math

import pytest
import torch

import tropd
from test_scripts import SUMMARY_FIELDS, metrics, ok, one_line_error, run, summary


def test_trust_mask_mean_matches_acceptance_probability():
    teacher = torch.log(torch.tensor([[0.05, 0.3, 0.5, 0.9]]))
    student = torch.log(torch.tensor([[0.5, 0.6, 0.5, 0.3]]))
    want = [min(t / s, 1.0) for t, s in zip([0.05, 0.3, 0.5, 0.9], [0.5, 0.6, 0.5, 0.3])]  # 0.1, 0.5, 1, 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([tropd.trust_mask(teacher, student, generator=g) for _ in range(20000)])  # (N, 1, 4)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    for j, p in enumerate(want):
        assert draws[:, 0, j].mean().item() == pytest.approx(p, abs=0.015)
    assert (draws[:, 0, 2:] == 1).all()  # the teacher likes the token at least as much: always trusted
    # the same generator seed gives the same draws; given uniforms are compared with P
    a = tropd.trust_mask(teacher, student, generator=torch.Generator().manual_seed(5))
    b = tropd.trust_mask(teacher, student, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    u = torch.tensor([[0.09, 0.51, 0.99, 0.0]])
    assert tropd.trust_mask(teacher, student, uniform=u).tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_prefix_length_cosine_schedule():
    for length in (0, 1, 7, 100):
        for total in (1, 10, 37):
            lengths = [tropd.prefix_length(t, total, length) for t in range(total + 5)]
            for t, got in enumerate(lengths):
                want = 0 if t >= total else int(math.floor((1 + math.cos(math.pi * t / total)) / 2 * length))
                assert got == want
            assert lengths[0] == length and lengths[total:] == [0] * 5
            assert all(a >= b for a, b in zip(lengths, lengths[1:]))  # never grows
    assert tropd.prefix_length(50, 100, 10) == 5


def test_topk_forward_kl_against_naive():
    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(2, 3, 20, generator=g), -1)[..., :6]  # top-K of a bigger vocab: sums < 1
    s = torch.log_softmax(torch.randn(2, 3, 20, generator=g), -1)[..., :6]
    got = tropd.topk_forward_kl(t, s)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            pt = [math.exp(x) for x in t[i, j].tolist()]
            ps = [math.exp(x) for x in s[i, j].tolist()]
            pt = [x / sum(pt) for x in pt]
            ps = [x / sum(ps) for x in ps]
            want = sum(a * math.log(a / b) for a, b in zip(pt, ps))
            assert got[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert (got >= 0).all()
    # renormalisation: a student that matches the teacher up to a constant factor on the K ids has KL 0
    assert tropd.topk_forward_kl(t, t - 1.3).abs().max() < 1e-6


def test_outlier_kl_gradient_is_student_minus_teacher_topk_probabilities():
    """Eq. 13's outlier term is a loss of theta: through the student's top-K log-probs (log_softmax of its
    logits z, gathered at the teacher's K ids), d KL(p_T || p_S) / d z_v = p_S,v - p_T,v for the K ids (both
    renormalised over them) and 0 for the rest of the vocabulary. Through tropd_loss, over n tokens, / n."""
    g = torch.Generator().manual_seed(3)
    V, K = 12, 5
    z = torch.randn(2, 3, V, generator=g, requires_grad=True)                # student logits
    teacher = torch.log_softmax(torch.randn(2, 3, V, generator=g), -1)
    top = teacher.topk(K, -1)
    student_topk = torch.log_softmax(z, -1).gather(-1, top.indices)
    kl = tropd.topk_forward_kl(top.values, student_topk)
    kl.sum().backward()
    want = torch.zeros(2, 3, V)
    for i in range(2):
        for j in range(3):
            ids = top.indices[i, j].tolist()
            es = [math.exp(z[i, j, v].item()) for v in ids]
            et = [math.exp(teacher[i, j, v].item()) for v in ids]
            for v, a, b in zip(ids, es, et):
                want[i, j, v] = a / sum(es) - b / sum(et)
    torch.testing.assert_close(z.grad, want, rtol=1e-5, atol=1e-6)
    # in the loss: only the outlier tokens' KL counts, divided by the step's token count
    z.grad = None
    outliers = torch.tensor([[1., 0., 1.], [0., 0., 1.]])
    zeros = torch.zeros(2, 3)
    logp = torch.log_softmax(z, -1)[..., 0]                                  # any (B, R) log-probs: advantages are 0
    loss = tropd.tropd_loss(logp, logp.detach(), zeros, torch.ones(2, 3), zeros, 0.0, 6.0,
                            tropd.topk_forward_kl(top.values, torch.log_softmax(z, -1).gather(-1, top.indices)) * outliers)
    loss.backward()
    torch.testing.assert_close(z.grad, want * outliers[..., None] / 6, rtol=1e-5, atol=1e-6)


def test_tropd_advantage_outlier_kinds():
    teacher = torch.tensor([[-5.0, -1.0]])
    student = torch.tensor([[-1.0, -2.0]])
    trusted = torch.tensor([[0.0, 1.0]])
    fkl = torch.tensor([[0.7, 0.2]], requires_grad=True)
    opd = teacher - student  # [-4, 1]
    def adv(kind, outlier=fkl, mask=trusted):
        return tropd.tropd_advantage(teacher, student, mask, outlier, kind, -2.0)
    torch.testing.assert_close(adv("fkl"), torch.tensor([[0.0, 1.0]]))  # the KL goes into the loss instead
    torch.testing.assert_close(adv("fkl-advantage"), torch.tensor([[-0.7, 1.0]]))
    assert not adv("fkl-advantage").requires_grad  # the earlier reading: a detached value
    torch.testing.assert_close(adv("mask", None), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(adv("clip", None), torch.tensor([[-2.0, 1.0]]))
    torch.testing.assert_close(adv("fkl", mask=torch.ones(1, 2)), opd)


def test_tropd_loss_value_and_gradient():
    """On-policy tokens: the IS-REINFORCE term; prefix tokens: -beta * log pi_S; one token mean."""
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(2, 4, generator=g)).requires_grad_()
    rollout = logp.detach() + 0.1 * torch.randn(2, 4, generator=g)
    adv = torch.randn(2, 4, generator=g)
    prefix = torch.tensor([[0., 0., 0., 0.], [1., 1., 0., 0.]])
    policy = torch.tensor([[1., 1., 1., 0.], [0., 0., 1., 1.]])
    beta = 0.5
    loss = tropd.tropd_loss(logp, rollout, adv, policy, prefix, beta)
    n = 7
    want = 0.0
    for i in range(2):
        for t in range(4):
            if policy[i, t]:
                want -= math.exp(logp[i, t].item() - rollout[i, t].item()) * adv[i, t].item() / n
            if prefix[i, t]:
                want -= beta * logp[i, t].item() / n
    assert loss.item() == pytest.approx(float(want), rel=1e-5)
    loss.backward()
    ratio = torch.exp(logp.detach() - rollout)
    torch.testing.assert_close(logp.grad, (-ratio * adv * policy - beta * prefix) / n)
    # the prefix term raises the student's log-prob of the teacher's tokens: a gradient step lowers the loss there
    assert (logp.grad[prefix.bool()] < 0).all()


def test_guided_rows_prefix_then_continuation():
    eos = 2
    rollout = {"prompt_width": 1,
               "input_ids": torch.tensor([[9, 5, 6, eos], [9, 7, eos, 0], [9, 8, eos, 0]]),
               "response_mask": torch.tensor([[1., 1., 1.], [1., 1., 0.], [1., 1., 0.]]),
               "logp": torch.tensor([[-.1, -.2, -.3], [-.4, -.5, 0.], [-.6, -.7, 0.]])}
    prefixes = [[], [4, 4], [4, 4, eos]]  # on-policy; guided; guided by a whole teacher response
    responses, logps, lens = tropd.guided_rows(rollout, prefixes, eos)
    assert responses == [[5, 6, eos], [4, 4, 7, eos], [4, 4, eos]]
    assert logps[0] == pytest.approx([-.1, -.2, -.3])
    assert logps[1] == pytest.approx([0, 0, -.4, -.5]) and logps[2] == [0.0] * 3
    assert lens == [0, 2, 3]


# ----------------------------------------------------------------------------- end to end

SHORT = ["--steps", 3, "--prompts-per-step", 8, "--micro-batch-size", 20, "--guide-steps", 3]


def test_smoke(tmp_path):
    out = tmp_path / "run"
    proc = ok(run("tropd.py", *SHORT, "--out", out))
    s = summary(out)
    assert SUMMARY_FIELDS <= set(s) and s["method"] == "tropd" and s["teacher_accuracy"] > 0.9
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == s
    m = metrics(out)
    assert m[0]["guide/prefix_fraction"] == 1.0 and m[-1]["guide/prefix_fraction"] < 1.0
    assert all(0 < x["trust/trusted_fraction"] < 1 and x["trust/outlier_advantage"] == 0 for x in m)  # fkl: a loss
    assert all(x["trust/outlier_kl"] > 0 for x in m)


def test_outlier_kinds_end_to_end(tmp_path):
    """One step each on the same rollout: --outlier fkl-advantage (the earlier reading) gives each outlier minus
    its top-K forward KL as advantage; --outlier fkl trains the KL itself, so its gradient (and loss) differ from
    --outlier mask's, which drops the outliers (a KL without gradient through the model would equal mask)."""
    m = {}
    for kind in ("fkl", "mask", "fkl-advantage"):
        ok(run("tropd.py", "--steps", 1, "--prompts-per-step", 8, "--micro-batch-size", 40, "--outlier", kind,
               "--out", tmp_path / kind))
        m[kind] = metrics(tmp_path / kind)[0]
    a = m["fkl-advantage"]
    assert a["trust/outlier_advantage"] == pytest.approx(-a["trust/outlier_kl"]) and a["trust/outlier_kl"] > 0
    assert m["fkl"]["trust/outlier_kl"] == pytest.approx(m["mask"]["trust/outlier_kl"])  # the same rollout
    assert m["fkl"]["train/loss"] > m["mask"]["train/loss"]  # + the outliers' KL / n_tokens
    assert m["fkl"]["train/grad_norm"] != pytest.approx(m["mask"]["train/grad_norm"], rel=1e-4)


def test_two_processes_match_one(tmp_path):
    args = [*SHORT, "--lr", 1e-3]
    ok(run("tropd.py", *args, "--gpus", 1, "--out", tmp_path / "one"))
    ok(run("tropd.py", *args, "--gpus", 2, "--out", tmp_path / "two"))
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in ("train/loss", "trust/trusted_fraction", "guide/prefix_fraction", "rollout/reward_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_prompts_without_teacher_responses_use_the_teacher(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    ok(run("tropd.py", "--data", data, "--steps", 1, "--prompts-per-step", 8, "--micro-batch-size", 40,
           "--out", out))
    assert metrics(out)[0]["guide/prefix_fraction"] == 1.0


def test_unknown_outlier_kind(tmp_path):
    one_line_error(run("tropd.py", "--outlier", "kl", "--out", tmp_path / "r"), "--outlier", "fkl, fkl-advantage, mask, clip")
