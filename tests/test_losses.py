"""The methods' losses against naive references written independently."""

import math

import pytest
import torch

import dpo
import sft


def _naive_dpo(pc, pr, rc, rr, beta):
    """Per pair, in Python float64: log(1 + exp(-beta * ((pc - rc) - (pr - rr))))."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        z = beta * ((a - c) - (b - d))
        out.append(math.log1p(math.exp(-z)))
    return out


def _inputs(B=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # summed log-probs are negative and can be tens of nats apart
    return [-(torch.rand(B, generator=g, dtype=dtype) * 30) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_naive_reference(beta):
    pc, pr, rc, rr = _inputs()
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (7,)  # per pair, not reduced
    ref = _naive_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta)
    torch.testing.assert_close(losses, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr), rtol=1e-12, atol=1e-12)


def test_dpo_loss_known_values_and_direction():
    # equal policy and reference: z = 0, loss = log 2 for every pair
    x = torch.tensor([-3.0, -10.0])
    losses, _, _ = dpo.dpo_loss(x, x - 1, x, x - 1, 0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    # raising the chosen log-prob above the reference lowers the loss; raising the rejected one raises it
    base = torch.tensor([-5.0])
    up = dpo.dpo_loss(base + 1, base, base, base, 0.5)[0]
    down = dpo.dpo_loss(base, base + 1, base, base, 0.5)[0]
    assert up.item() < math.log(2.0) < down.item()


def test_dpo_loss_is_stable_for_large_margins():
    pc = torch.tensor([0.0, -2000.0], dtype=torch.float32)
    pr = torch.tensor([-2000.0, 0.0], dtype=torch.float32)
    zero = torch.zeros(2)
    losses, _, _ = dpo.dpo_loss(pc, pr, zero, zero, 1.0)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(2000.0, rel=1e-6)


def test_dpo_rewards_are_detached():
    pc, pr, rc, rr = (t.requires_grad_() for t in _inputs(B=3))
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, 0.1)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_loss_gradient_closed_form(beta):
    pc, pr, rc, rr = _inputs(B=5, seed=1)
    pc.requires_grad_()
    pr.requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()  # pairs are independent, so the sum's gradient is the per-pair one
    z = chosen_rewards - rejected_rewards
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-z), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-z), rtol=1e-10, atol=1e-12)

    # per-pair Jacobian is diagonal: d loss_i / d policy_chosen_j = 0 for i != j
    jac = torch.autograd.functional.jacobian(lambda a: dpo.dpo_loss(a, pr.detach(), rc, rr, beta)[0], pc.detach())
    torch.testing.assert_close(jac, torch.diag(-beta * torch.sigmoid(-z)), rtol=1e-10, atol=1e-12)


def test_dpo_loss_gradcheck():
    pc, pr, rc, rr = (t.requires_grad_() for t in _inputs(B=4, seed=2))
    assert torch.autograd.gradcheck(lambda a, b, c, d: dpo.dpo_loss(a, b, c, d, 0.3)[0], (pc, pr, rc, rr))


def test_sft_loss_matches_naive_token_loop():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    n_tokens = 20.0  # the whole optimizer step's count, larger than this micro-batch's 9
    total = 0.0
    for i in range(3):
        for t in range(5):
            if mask[i, t] == 1:
                total -= logps[i, t].item()
    loss = sft.sft_loss(logps, mask, n_tokens)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(total / n_tokens, rel=1e-12)


def test_sft_loss_gradient_per_token():
    """Each valid completion token's log-prob gets -1 / n_tokens (the step's count): the token mean of the
    NLL; padding gets 0; a micro-batch given the step's count carries its share."""
    logp = (-torch.rand(2, 4, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1., 1., 1., 0.], [1., 0., 0., 0.]], dtype=torch.float64)
    sft.sft_loss(logp, mask).backward()
    torch.testing.assert_close(logp.grad, -mask / 4)
    logp.grad = None
    sft.sft_loss(logp, mask, n_tokens=10).backward()
    torch.testing.assert_close(logp.grad, -mask / 10)


def test_sft_loss_only_counts_masked_tokens():
    logps = (-torch.rand(2, 4, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    base = sft.sft_loss(logps, mask, 3)
    # changing the log-probs of masked-out positions (even to huge values) leaves the loss as it is
    changed = logps.detach().clone()
    changed[mask == 0] = -1e6
    assert sft.sft_loss(changed, mask, 3).item() == pytest.approx(base.item(), rel=1e-12)
    # and their gradient is exactly zero, the others' is -1 / n_tokens
    base.backward()
    torch.testing.assert_close(logps.grad, -mask / 3)
