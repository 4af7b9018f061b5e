"""dppo.py: divergences, the trust-region mask, the losses and their gradients against naive references;
common.all_max; end-to-end runs (Top-K on 1 and 2 processes, the clip baseline, bad input)."""

import math

import pytest
import torch

import common
import dppo
from test_scripts import SUMMARY_FIELDS, metrics, ok, one_line_error, run, summary


def _logps(shape, seed, low=-6.0):
    """Log-probs of sampled tokens, from near-certain (about -1e-9) to rare (about e^-6)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * low
    x.view(-1)[0] = -1e-9
    return x


# ----------------------------------------------------------------------------- divergences

def _naive_binary(lp, lmu, kind):
    pi, mu = math.exp(lp), math.exp(lmu)
    if kind == "tv":
        return abs(mu - pi)
    rest_mu, rest_pi = max(1 - mu, 1e-12), max(1 - pi, 1e-12)
    return mu * math.log(mu / pi) + rest_mu * math.log(rest_mu / rest_pi)


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_binary_divergence_matches_naive_reference(kind):
    logp, rollout_logp = _logps((4, 5), 0), _logps((4, 5), 1)
    got = dppo.binary_divergence(logp, rollout_logp, kind)
    assert got.shape == (4, 5) and torch.isfinite(got).all() and (got >= 0).all()
    for i in range(4):
        for t in range(5):
            want = _naive_binary(logp[i, t].item(), rollout_logp[i, t].item(), kind)
            assert got[i, t].item() == pytest.approx(want, rel=1e-6, abs=1e-9), (i, t)
    assert dppo.binary_divergence(logp, logp, kind).abs().max() < 1e-9  # zero when the policies agree


def _distributions(V, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.softmax(2 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    pi = torch.softmax(torch.log(mu) + 0.5 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    return mu.tolist(), pi.tolist()


def _naive_set_divergence(mu, pi, tokens, kind):
    """D over the partition {each token of the set} U {everything else}, in plain Python."""
    tokens = sorted(set(tokens))
    parts_mu = [mu[v] for v in tokens] + [max(1 - sum(mu[v] for v in tokens), 1e-12)]
    parts_pi = [pi[v] for v in tokens] + [max(1 - sum(pi[v] for v in tokens), 1e-12)]
    if kind == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(parts_mu, parts_pi))
    return sum(a * math.log(a / b) for a, b in zip(parts_mu, parts_pi))


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_divergence_over_topk_and_sampled_token(kind):
    """Rows where the sampled token is outside mu's top-K and rows where it is inside (counted once)."""
    V, K = 12, 4
    cases = []
    for seed in range(6):
        mu, pi = _distributions(V, seed)
        top = sorted(range(V), key=lambda v: -mu[v])[:K]
        sampled = top[1] if seed % 2 else sorted(range(V), key=lambda v: -mu[v])[K + seed]
        cases.append((mu, pi, top, sampled))
    top_ids = torch.tensor([[c[2]] for c in cases])                           # (B, 1, K)
    sampled_ids = torch.tensor([[c[3]] for c in cases])                        # (B, 1)
    log = lambda probs, ids: torch.tensor(probs, dtype=torch.float64).log()[ids]  # noqa: E731
    logp_set = dppo.with_sampled_token(torch.stack([log(c[1], c[2]) for c in cases])[:, None],
                                       torch.stack([log(c[1], [c[3]]) for c in cases]), top_ids, sampled_ids)
    mu_set = dppo.with_sampled_token(torch.stack([log(c[0], c[2]) for c in cases])[:, None],
                                     torch.stack([log(c[0], [c[3]]) for c in cases]), top_ids, sampled_ids)
    assert logp_set.shape == (6, 1, K + 1)
    got = dppo.topk_divergence(logp_set, mu_set, kind)
    assert got.shape == (6, 1) and torch.isfinite(got).all()
    for i, (mu, pi, top, sampled) in enumerate(cases):
        want = _naive_set_divergence(mu, pi, top + [sampled], kind)
        assert got[i, 0].item() == pytest.approx(want, rel=1e-9), i


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_divergence_over_the_whole_vocabulary_is_exact(kind):
    mu, pi = _distributions(9, 7)
    got = dppo.topk_divergence(torch.tensor(pi, dtype=torch.float64).log(), torch.tensor(mu, dtype=torch.float64).log(),
                               kind).item()
    if kind == "tv":
        exact = 0.5 * sum(abs(a - b) for a, b in zip(mu, pi))
    else:
        exact = sum(a * math.log(a / b) for a, b in zip(mu, pi))
    assert got == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_with_sampled_token_lists_each_token_once():
    top_ids = torch.tensor([[[3, 1]], [[3, 1]]])
    got = dppo.with_sampled_token(torch.tensor([[[-0.5, -1.0]], [[-0.5, -1.0]]]), torch.tensor([[-1.0], [-4.0]]),
                                  top_ids, torch.tensor([[1], [5]]))
    assert got[0, 0].tolist() == [-0.5, -1.0, -math.inf] and got[1, 0].tolist() == [-0.5, -1.0, -4.0]


# ----------------------------------------------------------------------------- mask and losses

def test_dppo_mask_four_cases_and_the_threshold():
    """Masked only when outside the trust region AND moving further away."""
    lmu = math.log(0.5)
    up, down = torch.tensor(math.log(0.9)), torch.tensor(math.log(0.1))          # ratio 1.8 / 0.2
    cases = [  # (logp, A, D, expected mask)
        (up, 1.0, 0.4, 0.0),     # A > 0, ratio > 1, D > delta: pushing pi further up -> masked
        (down, -1.0, 0.4, 0.0),  # A < 0, ratio < 1, D > delta: pushing pi further down -> masked
        (down, 1.0, 0.4, 1.0),   # A > 0, ratio < 1: the update moves back toward mu -> kept
        (up, -1.0, 0.4, 1.0),    # A < 0, ratio > 1: moves back -> kept
        (up, 1.0, 0.1, 1.0),     # inside the trust region -> kept
        (down, -1.0, 0.1, 1.0),
        (up, 0.0, 0.4, 1.0),     # no advantage -> kept
    ]
    logp = torch.stack([c[0] for c in cases])[None]
    got = dppo.dppo_mask(logp, torch.full_like(logp, lmu), torch.tensor([[c[1] for c in cases]]),
                         torch.tensor([[c[2] for c in cases]]), 0.15)
    assert got.dtype == torch.float32 and got[0].tolist() == [c[3] for c in cases]


def test_dppo_mask_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    logp, lmu = _logps((6, 7), 2, low=-3), _logps((6, 7), 3, low=-3)
    adv = torch.randn(6, 7, generator=g, dtype=torch.float64)
    div = dppo.binary_divergence(logp, lmu, "tv")
    got = dppo.dppo_mask(logp, lmu, adv, div, 0.15)
    n_masked = 0
    for i in range(6):
        for t in range(7):
            r, a, dd = math.exp(logp[i, t] - lmu[i, t]), adv[i, t].item(), div[i, t].item()
            masked = dd > 0.15 and ((a > 0 and r > 1) or (a < 0 and r < 1))
            n_masked += masked
            assert got[i, t].item() == (0.0 if masked else 1.0)
    assert 0 < n_masked < 42


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 6
    lengths = [6, 1, 3, 5, 4]
    response_mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    rollout = _logps((B, T), seed + 10, low=-4)
    logp = rollout + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp[0, 0] = rollout[0, 0] + math.log(30.0)                                # a ratio above the cap C = 10
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) * response_mask
    trust = (torch.rand(B, T, generator=g) > 0.3).double()
    return logp, rollout, adv, trust, response_mask


def test_dppo_loss_value_and_gradient():
    """Gradient = that of -token_mean(M r A) (Eq. 11) wherever r < C; where r > C the ratio is capped at C."""
    logp, rollout, adv, trust, rmask = _loss_inputs()
    logp.requires_grad_(True)
    loss = dppo.dppo_loss(logp, rollout, adv, trust, rmask)
    loss.backward()
    grad = logp.grad.clone()
    N = rmask.sum().item()
    naive_value = 0.0
    for i in range(5):
        for t in range(6):
            r = math.exp(logp[i, t].item() - rollout[i, t].item())
            weight = adv[i, t].item() * min(r, 10.0) * trust[i, t].item() * rmask[i, t].item()
            naive_value += -weight * logp[i, t].item() / N
    assert loss.item() == pytest.approx(naive_value, rel=1e-12)

    # autograd of Eq. 11 written directly, with the ratio NOT detached
    x = logp.detach().clone().requires_grad_(True)
    (-(trust * torch.exp(x - rollout) * adv * rmask).sum() / N).backward()
    capped = (logp.detach() - rollout).exp() > 10
    assert capped.sum() == 1
    torch.testing.assert_close(grad[~capped], x.grad[~capped], rtol=1e-12, atol=1e-15)
    assert grad[capped].item() == pytest.approx(-adv[capped].item() * 10.0 * trust[capped].item() / N, rel=1e-12)
    assert (grad[trust == 0] == 0).all() and (grad[rmask == 0] == 0).all()


def _naive_clip(logp, old, adv, mask, lo, hi):
    terms = []
    for i in range(len(logp)):
        for t in range(len(logp[0])):
            if mask[i][t]:
                r = math.exp(logp[i][t] - old[i][t])
                terms.append(max(-adv[i][t] * r, -adv[i][t] * min(max(r, 1 - lo), 1 + hi)))
    return sum(terms) / len(terms)


def test_clip_loss_asymmetric_bounds_match_naive_reference():
    logp, rollout, adv, _, rmask = _loss_inputs(seed=1)
    got = dppo.clip_loss(logp, rollout, adv, rmask, 0.2, 0.28).item()
    assert got == pytest.approx(_naive_clip(logp.tolist(), rollout.tolist(), adv.tolist(), rmask.tolist(), 0.2, 0.28),
                                rel=1e-12)
    # a ratio of 1.25 is inside [0.8, 1.28] but outside the symmetric [0.8, 1.2]: only the high bound tells
    one = torch.tensor([[math.log(1.25)]], requires_grad=True)
    dppo.clip_loss(one, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28).backward()
    assert one.grad.item() == pytest.approx(-1.25)


def test_on_policy_dppo_and_clip_gradients_agree():
    """At the first update (pi = mu, r = 1) neither trust region acts: the two losses have the same gradient."""
    _, rollout, adv, _, rmask = _loss_inputs(seed=2)
    grads = []
    def dppo_loss(x):
        return dppo.dppo_loss(x, rollout, adv, dppo.dppo_mask(x, rollout, adv, torch.ones_like(x), 0.15), rmask)

    for fn in (dppo_loss, lambda x: dppo.clip_loss(x, rollout, adv, rmask, 0.2, 0.28)):
        x = rollout.clone().requires_grad_(True)
        fn(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    assert grads[0].abs().sum() > 0


def test_group_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    got = dppo.group_advantages(scores, 4)
    want = []
    for g in range(3):
        group = scores[4 * g:4 * g + 4].tolist()
        want += [s - sum(group) / 4 for s in group]
    assert got.tolist() == pytest.approx(want)
    assert (got[4:8] == 0).all()  # all right: nothing to learn, no std division blowing up


def test_all_max_on_one_process():
    d = common.Dist(0, 1, torch.device("cpu"))
    assert common.all_max(2.5, d).item() == 2.5
    assert common.all_max(torch.tensor([1.0, -3.0]), d).tolist() == [1.0, -3.0]


# ----------------------------------------------------------------------------- end to end

SMALL = ["--steps", 3, "--prompts-per-step", 8, "--group-size", 4, "--minibatches", 2, "--micro-batch-size", 4,
         "--lr", 3e-3]
KEYS = ("train/loss", "policy/masked_frac", "policy/clipfrac", "policy/divergence_mean", "policy/divergence_max",
        "policy/approx_kl", "policy/entropy", "rollout/reward_mean", "rollout/response_length")


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join((common.WORLD / "test_id.jsonl").read_text().splitlines(keepends=True)[:32]))
    return ["--eval-data", path, "--ood-data", path]


@pytest.fixture(scope="module")
def topk_one_process(tmp_path_factory, small_eval):
    out = tmp_path_factory.mktemp("dppo") / "one"
    ok(run("dppo.py", *SMALL, *small_eval, "--divergence", "topk_kl", "--out", out))
    return out


def test_smoke_topk_summary_and_metrics(topk_one_process):
    out = topk_one_process
    s = summary(out)
    assert SUMMARY_FIELDS <= set(s) and s["method"] == "dppo" and s["steps"] == 3
    assert (s["trust_region"], s["divergence"], s["delta"]) == ("dppo", "topk_kl", 0.05)
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    for key in KEYS:
        assert all(math.isfinite(r[key]) for r in m), key
    assert all(0 <= r["policy/masked_frac"] <= 1 for r in m)
    assert all(r["policy/divergence_max"] >= r["policy/divergence_mean"] for r in m)
    assert any(r["policy/masked_frac"] > 0 for r in m)  # off-policy minibatches left the trust region
    assert (out / "model" / "model.safetensors").is_file()


def test_two_processes_match_one(topk_one_process, small_eval, tmp_path):
    """--gpus 2 (gloo, FSDP2; Top-K gathered through the sharded model) gives the same samples and losses."""
    ok(run("dppo.py", *SMALL, *small_eval, "--divergence", "topk_kl", "--gpus", 2, "--out", tmp_path / "two"))
    a, b = metrics(topk_one_process), metrics(tmp_path / "two")
    for key in ("rollout/reward_mean", "rollout/response_length"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for key in ("train/loss", "policy/masked_frac", "policy/divergence_mean", "policy/divergence_max",
                "policy/entropy"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-3, abs=1e-4), key


def test_clip_baseline_runs(small_eval, tmp_path):
    """--trust-region clip: the ratio clip acts (clipfrac > 0 in some step)."""
    ok(run("dppo.py", *SMALL, *small_eval, "--trust-region", "clip", "--out", tmp_path / "clip"))
    assert summary(tmp_path / "clip")["trust_region"] == "clip"
    m = metrics(tmp_path / "clip")
    assert any(r["policy/clipfrac"] > 0 for r in m)


def test_unknown_divergence(tmp_path):
    one_line_error(run("dppo.py", "--divergence", "tv", "--out", tmp_path), "--divergence", "'tv'")


def test_bf16_rollouts_differ_from_the_learner(small_eval, tmp_path):
    """--rollout-precision bf16: the first update of the first minibatch already sees mu != pi_theta
    (an fp32 rollout agrees with the learner there to float error, about 1e-7)."""
    ok(run("dppo.py", "--steps", 1, "--prompts-per-step", 8, "--group-size", 4, "--epochs", 1, "--minibatches", 1,
           "--rollout-precision", "bf16", *small_eval, "--out", tmp_path / "run"))
    assert metrics(tmp_path / "run")[0]["policy/divergence_mean"] > 1e-5


def test_rounded_weights_round_inside_and_restore_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    exact = [p.detach().clone() for p in model.parameters()]
    with dppo.rounded_weights(model, torch.bfloat16):
        for p, value in zip(model.parameters(), exact):
            assert p.dtype == torch.float32 and torch.equal(p, value.bfloat16().float())
            assert not torch.equal(p, value)
    for p, value in zip(model.parameters(), exact):
        assert torch.equal(p, value)
