"""grpo.py: group advantages, k3 and the three loss aggregations against naive references; end-to-end runs."""

import math
import signal
import statistics
import sys
import warnings

import pytest
import torch

import common
import grpo
from test_scripts import SUMMARY_FIELDS, metrics, ok, one_line_error, run, summary


# ----------------------------------------------------------------------------- advantages and k3

def test_grpo_advantages_match_statistics_module():
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.tensor([[0., 0., 0., 0.], [1., 1., 1., 1.], [1., 0., 0., 1.], [0., 1., 0., 0.]]),
                         torch.randn(3, 4, generator=g)]).double()
    got, centred = grpo.grpo_advantages(rewards), grpo.grpo_advantages(rewards, scale=False)
    for p, row in enumerate(rewards.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)  # stdev: the unbiased one
        for i, r in enumerate(row):
            assert got[p, i].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-9)
            assert centred[p, i].item() == pytest.approx(r - mean, abs=1e-12)
    assert (got[:2] == 0).all()                   # all-wrong and all-right groups: no signal
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # torch's std of an empty tensor would warn
        empty = torch.zeros(0, 4)
        assert grpo.grpo_advantages(empty) is empty and grpo.grpo_advantages(empty, scale=False) is empty


def test_kl_k3_formula_sign_and_expectation():
    g = torch.Generator().manual_seed(1)
    logp, ref = -3 * torch.rand(50, generator=g, dtype=torch.float64), -3 * torch.rand(50, generator=g,
                                                                                        dtype=torch.float64)
    got = grpo.kl_k3(logp, ref)
    for a, b, k in zip(logp.tolist(), ref.tolist(), got.tolist()):
        assert k == pytest.approx(math.exp(b) / math.exp(a) - math.log(math.exp(b) / math.exp(a)) - 1, abs=1e-12)
    assert (got >= 0).all() and (grpo.kl_k3(logp, logp) == 0).all()
    # unbiased for KL(pi_theta || pi_ref): its expectation under pi_theta, summed exactly over a vocabulary
    p = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    expectation = (p * grpo.kl_k3(p.log(), q.log())).sum().item()
    assert expectation == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist())), rel=1e-12)


# ----------------------------------------------------------------------------- the loss

def _groups(P=3, k=4, T=6, seed=0):
    """Random right-padded (P, k, T) inputs, lengths 1..T, garbage (not zeros) on the padding, so a
    loss that reads past a response's end is caught. Ratios from about 0.3 to 3."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[1, T] + torch.randint(1, T + 1, (k - 2,), generator=g).tolist() for _ in range(P)]
    mask = torch.tensor([[[1.0] * n + [0.0] * (T - n) for n in row] for row in lengths], dtype=torch.float64)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    rollout_logp = -rand(P, k, T).abs() - 0.1
    logp = rollout_logp + 0.4 * rand(P, k, T)
    ref_logp = rollout_logp + 0.3 * rand(P, k, T)
    return logp, rollout_logp, ref_logp, rand(P, k), mask, lengths


def _naive_loss(logp, rollout_logp, ref_logp, adv, lengths, T, eps, beta, agg, weight=None):
    """Token by token in plain Python: (-min(rho A, clip(rho) A) + beta k3) * weight; then the aggregation."""
    per_response, every_token = [], []
    for p, row in enumerate(lengths):
        for i, n in enumerate(row):
            terms = []
            for t in range(n):
                lp, old = logp[p][i][t], rollout_logp[p][i][t]
                rho, a = math.exp(lp - old), adv[p][i]
                term = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
                if beta:
                    x = math.exp(ref_logp[p][i][t]) / math.exp(lp)  # pi_ref / pi_theta
                    term += beta * (x - math.log(x) - 1)
                terms.append(term * (1 if weight is None else weight[p][i][t]))
            per_response.append(sum(terms) / n)
            every_token += terms
    if agg == "sequence":
        return sum(per_response) / len(per_response)
    if agg == "token":
        return sum(every_token) / len(every_token)
    return sum(every_token) / (len(per_response) * T)


AGGS = ["sequence", "token", "constant"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_grpo_loss_matches_naive_reference(agg, beta):
    eps = 0.2
    logp, old, ref, adv, mask, lengths = _groups(seed=2)
    rho = (logp - old).exp()[mask.bool()]
    assert (rho > 1 + eps).any() and (rho < 1 - eps).any() and ((rho - 1).abs() < eps).any()
    got = grpo.grpo_loss(logp, old, None if beta == 0 else ref, adv, mask, eps, beta, agg)
    want = _naive_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, mask.shape[-1], eps, beta,
                       agg)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_truncated_importance_weights_scale_each_token(agg):
    """--tis-cap: grpo_loss's `weight` (min(pi_old / mu, C)) multiplies each token's loss, KL term included."""
    logp, old, ref, adv, mask, lengths = _groups(seed=3)
    mu = old + 0.6 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weight = (old - mu).exp().clamp(max=2.0) * mask
    assert (weight[mask.bool()] == 2.0).any() and (weight[mask.bool()] < 1).any()
    got = grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04, agg, weight=weight)
    want = _naive_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, mask.shape[-1], 0.2, 0.04,
                       agg, weight.tolist())
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert got.item() != pytest.approx(grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04, agg).item(), rel=1e-3)


def test_aggregations_differ():
    """The three normalisations weight the same tokens differently (a loss ignoring `agg` fails here)."""
    logp, old, ref, adv, mask, _ = _groups(seed=4)
    values = [grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04, agg).item() for agg in AGGS]
    assert len({round(v, 9) for v in values}) == 3


@pytest.mark.parametrize("agg", AGGS)
def test_grpo_loss_gradient_is_zero_exactly_where_the_clip_binds(agg):
    """d loss / d logp_t = w_t (-A rho_t + beta (1 - pi_ref / pi_theta)), where the surrogate's part is 0 if
    the clip binds (A > 0 and rho > 1 + eps, or A < 0 and rho < 1 - eps) and w_t 0 on padding;
    w_t = 1 / (|o_i| P k) (sequence), 1 / (valid tokens) (token), 1 / (P k T) (constant)."""
    eps, beta = 0.2, 0.1
    logp, old, ref, adv, mask, lengths = _groups(seed=3)
    P, k, T = mask.shape
    logp.requires_grad_(True)
    grpo.grpo_loss(logp, old, ref, adv, mask, eps, beta, agg).backward()
    N = sum(map(sum, lengths))
    binding = 0
    for p in range(P):
        for i in range(k):
            n = lengths[p][i]
            w = {"sequence": 1 / (n * P * k), "token": 1 / N, "constant": 1 / (P * k * T)}[agg]
            for t in range(T):
                lp = logp[p, i, t].item()
                rho, a = math.exp(lp - old[p, i, t].item()), adv[p, i].item()
                clipped = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
                binding += t < n and clipped
                want = 0.0 if t >= n else w * ((0.0 if clipped else -a * rho)
                                               + beta * (1 - math.exp(ref[p, i, t].item() - lp)))
                assert logp.grad[p, i, t].item() == pytest.approx(want, abs=1e-12), (p, i, t)
    assert binding > 0


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_with_the_global_normaliser_add_up(agg):
    """Two calls on parts of the batch, each given the whole batch's n, sum to the whole batch's loss."""
    logp, old, ref, adv, mask, _ = _groups(P=4, seed=5)
    n = {"sequence": mask[..., 0].numel(), "token": mask.sum(), "constant": mask.numel()}[agg]
    whole = grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04, agg)
    parts = [grpo.grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], 0.2, 0.04, agg, n)
             for s in (slice(0, 1), slice(1, 4))]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)


def test_grpo_loss_gradient_on_policy_per_token():
    """At rho = 1 the clip is inactive and the gradient on token t of response i is -A_i over the aggregation's
    denominator: P k |o_i| (sequence, Eq. 3), the batch's valid tokens (token, DAPO), P k T (constant, Dr. GRPO).
    The k3 term adds beta * (1 - pi_ref / pi_theta) per token, 0 where the policy is the reference."""
    g = torch.Generator().manual_seed(6)
    P, k, T = 2, 2, 4
    mask = torch.ones(P, k, T)
    mask[0, 0, 1:] = 0
    mask[1, 1, 3:] = 0
    lengths = mask.sum(-1, keepdim=True)                                        # (P, k, 1): 1, 4, 4, 3
    adv = torch.randn(P, k, generator=g)
    want = {"sequence": -adv[..., None] / (P * k * lengths), "token": -adv[..., None] / mask.sum(),
            "constant": -adv[..., None] / (P * k * T)}
    for agg, grad in want.items():
        logp = (-torch.rand(P, k, T, generator=g)).requires_grad_()
        grpo.grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0, agg).backward()
        torch.testing.assert_close(logp.grad, grad * mask)
    logp = (-torch.rand(P, k, T, generator=g)).requires_grad_()
    ref = -torch.rand(P, k, T, generator=g)
    beta = 0.3
    grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, 0.2, beta, "token").backward()
    k3 = beta * (1 - torch.exp(ref - logp.detach())) / mask.sum()
    torch.testing.assert_close(logp.grad, (want["token"] + k3) * mask)


def test_flat_rows_give_the_same_loss():
    """The loop passes (B, T) rows with advantages (B,): the same loss as the (P, k, T) groups."""
    logp, old, ref, adv, mask, _ = _groups(seed=6)
    for agg in AGGS:
        flat = [x.flatten(0, 1) for x in (logp, old, ref, adv, mask)]
        assert grpo.grpo_loss(*flat[:4], flat[4], 0.2, 0.04, agg).item() == pytest.approx(
            grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04, agg).item(), rel=1e-12)


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
    out = tmp_path_factory.mktemp("grpo") / "one"
    return ok(run("grpo.py", *SMALL, *small_eval, "--out", out)), out


def test_smoke_summary_and_metrics(one_process):
    _, out = one_process
    s = summary(out)
    assert SUMMARY_FIELDS <= set(s) and s["method"] == "grpo" and s["steps"] == 3
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    for key in ("train/loss", "policy/clipfrac", "policy/approx_kl", "policy/entropy", "policy/kl_ref",
                "rollout/reward_mean", "rollout/reward_std", "rollout/response_length", "rollout/truncated",
                "train/grad_norm", "train/lr", "sys/peak_mem_gb"):
        assert all(math.isfinite(r[key]) for r in m), key
    assert all(r["policy/kl_ref"] >= 0 and r["policy/approx_kl"] >= 0 for r in m)
    assert m[-1]["policy/kl_ref"] > 0                      # the policy has moved from the reference
    assert any(r["policy/clipfrac"] > 0 for r in m)       # 2 minibatches: the second update is off-policy
    assert all(0 <= r["rollout/reward_std"] <= 0.6 and r["rollout/response_length"] >= 1 for r in m)
    assert (out / "model" / "model.safetensors").is_file()


def test_beta_zero_loads_no_reference_and_the_default_is_on_policy(small_eval, tmp_path, monkeypatch):
    """--beta 0 (in this process, to count the loads): the policy is the only model loaded, and no
    policy/kl_ref is logged. With one minibatch and one epoch (the defaults) every update is on-policy:
    rho = 1, so nothing is clipped and approx_kl is 0 up to rounding."""
    loads = []

    def counting_load_model(path, d, trainable=True):
        loads.append(trainable)
        return common.load_model(path, d, trainable)

    monkeypatch.setattr(grpo, "load_model", counting_load_model)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "beta0"
    argv = ["--beta", 0, "--steps", 2, "--prompts-per-step", 4, "--group-size", 4, "--lr", 1e-3, *small_eval,
            "--out", out]
    monkeypatch.setattr(sys, "argv", ["grpo.py", *map(str, argv)])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        grpo.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert loads == [True]
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2] and all("policy/kl_ref" not in r for r in m)
    assert all(r["policy/clipfrac"] == 0 and r["policy/approx_kl"] < 1e-6 for r in m)
    assert summary(out)["method"] == "grpo"


def test_two_processes_match_one(one_process, small_eval, tmp_path):
    """--gpus 2 (gloo, FSDP2) samples the same responses and gives the same losses."""
    _, one = one_process
    ok(run("grpo.py", *SMALL, *small_eval, "--gpus", 2, "--out", tmp_path / "two"))
    a, b = metrics(one), metrics(tmp_path / "two")
    for key in ("rollout/reward_mean", "rollout/response_length"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for key in ("train/loss", "policy/entropy", "policy/kl_ref", "rollout/reward_std", "policy/clipfrac"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-4), key


def test_generation_in_micro_batches_samples_the_same(one_process, small_eval, tmp_path):
    """--generation-batch-size 6 (a bound on the KV cache) samples exactly the responses of the whole
    rollout in one call, so the run is the same up to float rounding of the log-probs."""
    _, one = one_process
    ok(run("grpo.py", *SMALL, *small_eval, "--generation-batch-size", 6, "--out", tmp_path / "mb"))
    a, b = metrics(one), metrics(tmp_path / "mb")
    for key in ("rollout/reward_mean", "rollout/response_length", "rollout/reward_std"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-4)


def test_bad_agg_is_one_error_line(tmp_path):
    one_line_error(run("grpo.py", "--agg", "mean", "--out", tmp_path), "--agg", "mean")
