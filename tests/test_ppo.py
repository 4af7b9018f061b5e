"""ppo.py: GAE, the clipped policy and value losses against naive references; the critic; end-to-end runs."""

import math

import pytest
import torch

import common
import ppo
from test_scripts import SUMMARY_FIELDS, metrics, ok, one_line_error, run, summary

CPU = common.Dist(0, 1, torch.device("cpu"))


def _rollout(B=6, T=7, seed=0):
    """Random right-padded (B, T) tensors: lengths 1..T, garbage (not zeros) on the padding, so a
    function that reads past a row's end is caught."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, T] + torch.randint(1, T + 1, (B - 2,), generator=g).tolist()
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    rand = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    return mask, lengths, rand


# ----------------------------------------------------------------------------- GAE

def _naive_gae(rewards, values, lengths, gamma, lam):
    """Per row, in plain Python: A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t,
    V after the last valid token = 0; returns = A + V; zeros on padding."""
    B, T = len(rewards), len(rewards[0])
    adv, ret = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = lengths[i]
        v = values[i][:n] + [0.0]
        delta = [rewards[i][t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[i][t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            ret[i][t] = adv[i][t] + v[t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_reference(gamma, lam):
    mask, lengths, rand = _rollout()
    rewards, values = rand(), rand()
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(want_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(want_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    mask, lengths, rand = _rollout(seed=1)
    rewards, values = rand(), rand()
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    for i, n in enumerate(lengths):
        for t in range(n):
            togo = sum(rewards[i, t:n].tolist())
            assert ret[i, t].item() == pytest.approx(togo, abs=1e-12)
            assert adv[i, t].item() == pytest.approx(togo - values[i, t].item(), abs=1e-12)


# ----------------------------------------------------------------------------- losses

def _naive_policy_loss(logp, old, adv, lengths, eps, weight=None):
    terms = []
    for i, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp[i][t] - old[i][t])
            w = 1.0 if weight is None else weight[i][t]
            terms.append(w * max(-adv[i][t] * rho, -adv[i][t] * min(max(rho, 1 - eps), 1 + eps)))
    return sum(terms) / len(terms)


def _policy_inputs(seed=0):
    mask, lengths, rand = _rollout(B=8, T=6, seed=seed)
    old = -rand().abs() - 0.1
    logp = old + 0.4 * rand()                    # ratios from about 0.3 to 3: inside and outside the clip
    return logp, old, rand(), mask, lengths


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.5])
def test_policy_loss_matches_naive_reference(eps):
    logp, old, adv, mask, lengths = _policy_inputs()
    rho = (logp - old).exp()[mask.bool()]
    assert (rho > 1 + eps).any() and (rho < 1 - eps).any() and ((rho - 1).abs() < eps).any()
    got = ppo.policy_loss(logp, old, adv, mask, eps)
    assert got.item() == pytest.approx(_naive_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), lengths, eps),
                                       rel=1e-12)


def test_truncated_importance_weights_scale_each_token():
    """--tis-cap: policy_loss's `weight` (min(pi_old / mu, C)) multiplies each token's loss; still the token mean."""
    logp, old, adv, mask, lengths = _policy_inputs(seed=3)
    mu = old + 0.6 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=old.dtype)
    weight = (old - mu).exp().clamp(max=2.0) * mask
    assert (weight[mask.bool()] == 2.0).any() and (weight[mask.bool()] < 1).any()
    got = ppo.policy_loss(logp, old, adv, mask, 0.2, weight=weight)
    want = _naive_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, weight.tolist())
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert got.item() != pytest.approx(ppo.policy_loss(logp, old, adv, mask, 0.2).item(), rel=1e-3)


@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_gradient_is_zero_exactly_where_the_clip_binds(weighted):
    """d loss / d logp_t = -w_t A_t rho_t / N, except 0 where the clip is active: A > 0 and rho > 1 + eps,
    or A < 0 and rho < 1 - eps; w_t 1, or --tis-cap's weight (the weighted case)."""
    eps = 0.2
    logp, old, adv, mask, lengths = _policy_inputs(seed=3)
    weight = torch.rand(old.shape, generator=torch.Generator().manual_seed(5), dtype=old.dtype) * 2 if weighted else None
    logp.requires_grad_(True)
    ppo.policy_loss(logp, old, adv, mask, eps, weight=weight).backward()
    N = sum(lengths)
    active = 0
    for i, n in enumerate(lengths):
        for t in range(logp.shape[1]):
            rho, a = math.exp(logp[i, t].item() - old[i, t].item()), adv[i, t].item()
            clipped = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
            active += t < n and clipped
            w = weight[i, t].item() if weighted else 1.0
            want = 0.0 if t >= n or clipped else -w * a * rho / N
            assert logp.grad[i, t].item() == pytest.approx(want, abs=1e-12), (i, t)
    assert active > 0


def _naive_value_loss(v, old, ret, lengths, clip):
    terms = []
    for i, n in enumerate(lengths):
        for t in range(n):
            vc = min(max(v[i][t], old[i][t] - clip), old[i][t] + clip)
            terms.append(max((v[i][t] - ret[i][t]) ** 2, (vc - ret[i][t]) ** 2))
    return 0.5 * sum(terms) / len(terms)


def test_policy_and_value_gradients_on_policy_per_token():
    """At rho = 1 (on-policy, the first update) the clip is inactive: each valid token's log-prob gets
    -A_t / N, N the valid tokens (Eq. 7 as a token mean). The value loss at V = V_old gets (V_t - R_t) / N."""
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1., 1., 1., 0.], [1., 1., 0., 0.]])
    logp = (-torch.rand(2, 4, generator=g)).requires_grad_()
    adv = torch.randn(2, 4, generator=g)
    ppo.policy_loss(logp, logp.detach(), adv, mask, 0.2).backward()
    torch.testing.assert_close(logp.grad, -adv * mask / 5)
    values = torch.randn(2, 4, generator=g).requires_grad_()
    returns = torch.randn(2, 4, generator=g)
    ppo.value_loss(values, values.detach(), returns, mask, 0.2).backward()
    torch.testing.assert_close(values.grad, (values.detach() - returns) * mask / 5)


@pytest.mark.parametrize("clip", [0.05, 0.2, 1.0])
def test_value_loss_matches_naive_reference(clip):
    mask, lengths, rand = _rollout(B=8, T=6, seed=5)
    old, ret = rand(), rand()
    v = old + 0.3 * rand()
    got = ppo.value_loss(v, old, ret, mask, clip)
    want = _naive_value_loss(v.tolist(), old.tolist(), ret.tolist(), lengths, clip)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_losses_with_step_token_count_add_up_over_micro_batches():
    """With n_tokens = the whole batch's count, the micro-batch losses sum to the batch's token mean."""
    logp, old, adv, mask, _ = _policy_inputs(seed=7)
    n = mask.sum()
    parts = [ppo.policy_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], 0.2, n) for i in (0, 3, 6)]
    assert sum(parts).item() == pytest.approx(ppo.policy_loss(logp, old, adv, mask, 0.2).item(), rel=1e-12)
    parts = [ppo.value_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], 0.2, n) for i in (0, 3, 6)]
    assert sum(parts).item() == pytest.approx(ppo.value_loss(logp, old, adv, mask, 0.2).item(), rel=1e-12)


# ----------------------------------------------------------------------------- rewards, whitening, critic

def test_token_rewards_kl_penalty_and_score_at_last_token():
    mask, lengths, rand = _rollout(B=5, T=4, seed=2)
    logp, ref = rand(), rand()
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    got = ppo.token_rewards(scores, logp, ref, mask, 0.1)
    for i, n in enumerate(lengths):
        for t in range(4):
            score = scores[i].item() if t == n - 1 else 0.0
            want = 0.0 if t >= n else -0.1 * (logp[i, t].item() - ref[i, t].item()) + score
            assert got[i, t].item() == pytest.approx(want, abs=1e-12)


def test_whiten_and_explained_variance():
    mask, lengths, rand = _rollout(seed=4)
    x = 3 + 2 * rand()
    w = ppo.whiten(x, mask, CPU)
    valid = torch.tensor([v for i, n in enumerate(lengths) for v in x[i, :n].tolist()], dtype=torch.float64)
    want = (valid - valid.mean()) / valid.std(unbiased=False)
    torch.testing.assert_close(w[mask.bool()], want, rtol=1e-6, atol=1e-6)
    assert (w[~mask.bool()] == 0).all()
    assert ppo.explained_variance(x, x, mask, CPU) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(x, valid.mean().item()), x, mask, CPU) == pytest.approx(0.0, abs=1e-9)


def test_critic_values_are_causal_and_start_at_zero(tiny_model_dir, tok):
    """V at response position t reads the state before y_t: changing y_t leaves V_<=t alone and moves V_t+1;
    a left-padded row gets the same values as alone; the zero-initialised head starts at V = 0."""
    critic = ppo.Critic(common.load_model(tiny_model_dir, CPU).lm.get_decoder())
    prompts = [common.prompt_ids(tok, p) for p in ("12+34=", "5-6=")]

    def batch(ps, responses):
        return common.pad_batch(ps, [common.response_ids(tok, r) for r in responses], tok.pad_token_id, "cpu")

    a = batch(prompts, ["46", "-1"])
    assert (ppo.critic_values(critic, a) == 0).all()
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    b = batch(prompts, ["47", "-1"])
    with torch.no_grad():
        va, vb = ppo.critic_values(critic, a), ppo.critic_values(critic, b)
        alone = ppo.critic_values(critic, batch(prompts[1:], ["-1"]))
    assert va.shape == (2, 3)
    torch.testing.assert_close(va[0, :2], vb[0, :2])             # y_1 differs ("6" vs "7"): V_0, V_1 do not
    assert not torch.allclose(va[0, 2], vb[0, 2])                # V_2 sees y_1
    torch.testing.assert_close(va[1], alone[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- end to end

SMALL = ["--steps", 3, "--prompts-per-step", 8, "--group-size", 4, "--minibatches", 2, "--micro-batch-size", 4,
         "--lr", 1e-3]


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join((common.WORLD / "test_id.jsonl").read_text().splitlines(keepends=True)[:32]))
    return ["--eval-data", path, "--ood-data", path]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_eval):
    out = tmp_path_factory.mktemp("ppo") / "one"
    return ok(run("ppo.py", *SMALL, *small_eval, "--out", out)), out


def test_smoke_summary_and_metrics(one_process):
    _, out = one_process
    s = summary(out)
    assert SUMMARY_FIELDS <= set(s) and s["method"] == "ppo" and s["steps"] == 3
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    for key in ("train/loss", "critic/loss", "policy/clipfrac", "policy/approx_kl", "policy/entropy",
                "critic/explained_variance", "rollout/reward_mean", "rollout/response_length", "rollout/kl_ref"):
        assert all(math.isfinite(r[key]) for r in m), key
    assert m[0]["rollout/kl_ref"] == pytest.approx(0, abs=1e-5)  # the policy starts as the reference
    assert m[0]["critic/explained_variance"] == pytest.approx(0, abs=1e-6)  # the critic starts at V = 0
    assert any(r["policy/clipfrac"] > 0 for r in m) and all(r["rollout/response_length"] >= 1 for r in m)
    assert (out / "model" / "model.safetensors").is_file()


def test_two_processes_match_one(one_process, small_eval, tmp_path):
    """--gpus 2 (gloo, FSDP2 on policy and critic) samples the same responses and gives the same losses."""
    _, one = one_process
    ok(run("ppo.py", *SMALL, *small_eval, "--gpus", 2, "--out", tmp_path / "two"))
    a, b = metrics(one), metrics(tmp_path / "two")
    for key in ("rollout/reward_mean", "rollout/response_length"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for key in ("train/loss", "critic/loss", "policy/entropy", "critic/explained_variance", "rollout/kl_ref"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-4), key


def test_minibatches_must_split_the_rollout(tmp_path):
    one_line_error(run("ppo.py", "--prompts-per-step", 3, "--group-size", 1, "--minibatches", 2, "--out", tmp_path),
                   "--minibatches 2")
