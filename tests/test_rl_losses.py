"""The online-RL maths against hand-worked numbers (RELIABILITY 17, 18)."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_estimate,
    rloo_advantages,
    truncated_importance_weights,
    whiten,
)


def test_kl_estimators_match_the_analytic_kl_of_two_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.4, 0.4, 0.2])
    analytic = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    expected = {name: (p * kl_estimate(p.log(), q.log(), name)).sum().item() for name in ("k1", "k2", "k3")}
    assert expected["k1"] == pytest.approx(analytic, abs=1e-7)  # unbiased
    assert expected["k3"] == pytest.approx(analytic, abs=1e-7)  # unbiased
    assert expected["k2"] == pytest.approx(analytic, rel=0.1)  # biased, second order close
    assert (kl_estimate(p.log(), q.log(), "k3") >= 0).all()  # k3 is never negative
    for name in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(p.log(), p.log(), name), torch.zeros(3))  # exactly 0 at step 0
    with pytest.raises(ValueError):
        kl_estimate(p, q, "k4")


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.9 * 0.3, A0 = 0.1 + 0.9 * A1
    a1 = 0.1 + 0.9 * 0.3
    torch.testing.assert_close(advantages[0], torch.tensor([0.1 + 0.9 * a1, a1, 0.3]))
    torch.testing.assert_close(returns[0], advantages[0] + values[0])
    # row 1 ends after two tokens: the padded value 9.9 never leaks in; V after the end is 0
    torch.testing.assert_close(advantages[1], torch.tensor([(0.4 - 0.2) + 0.9 * 0.6, 1.0 - 0.4, 0.0]))
    assert returns[1, 2] == 0
    # discounting: gamma 0.5, lam 1 -> A_t = sum of discounted rewards - V_t
    advantages, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages[0], torch.tensor([0.25, 0.5, 1.0]))


def test_whitening_stays_finite_on_one_sample_and_constants():
    mask = torch.ones(1, 1)
    assert torch.isfinite(whiten(torch.tensor([[3.0]]), mask)).all()
    assert torch.equal(whiten(torch.full((2, 3), 7.0), torch.ones(2, 3)), torch.zeros(2, 3))
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = whiten(x, mask)
    assert out[0, :3].mean().item() == pytest.approx(0, abs=1e-6) and out[0, :3].std().item() == pytest.approx(
        1, abs=1e-4
    )
    assert out[0, 3] == 0  # masked entries stay out
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0, :3].mean().item() == pytest.approx(2.0, abs=1e-5)


def test_group_advantages_by_hand_and_constant_groups_are_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    grpo = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased, as the paper's
    torch.testing.assert_close(grpo[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(grpo[4:], torch.zeros(4))  # identical rewards: 0, not NaN
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    rloo = rloo_advantages(rewards, 4)
    torch.testing.assert_close(rloo[:4], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(rloo[4:], torch.zeros(4))
    with pytest.raises(ValueError):
        rloo_advantages(rewards, 1)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.5]]))
    adv = torch.tensor([[2.0, 2.0, 2.0, -2.0]])
    loss, clipped = clipped_policy_loss(logp, old, adv, clip=0.2)
    # ratio 1: -A; ratio 1.5, A>0: clipped at 1.2; ratio 0.5, A>0: the smaller gain 0.5 is kept;
    # ratio 1.5, A<0: -A * 1.5
    torch.testing.assert_close(loss, torch.tensor([[-2.0, -2.4, -1.0, 3.0]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # first: V moved 0.5 -> clipped to 0.7; max((1 - 0)^2, (0.7 - 0)^2) = 1; second: no move, (0 - 1)^2
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.5]]))
    values2 = torch.tensor([[0.0]])
    loss2, clipped2 = clipped_value_loss(values2, torch.tensor([[0.5]]), torch.tensor([[0.0]]), clip=0.2)
    # moved down to 0 -> clipped to 0.3: max(0, 0.09) = 0.09 (the clipped term is the one taken)
    torch.testing.assert_close(loss2, torch.tensor([[0.045]]))
    assert clipped2.item() == 1.0 and clipped.tolist() == [[0.0, 0.0]]


def test_truncated_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, -2.0]])  # ratios e^0.5, e^-1, e^1.5
    weights, truncated = truncated_importance_weights(trainer, sampler, cap=3.0)
    assert weights.tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-1.0), 3.0])
    assert truncated.tolist() == [[0.0, 0.0, 1.0]]
    assert not weights.requires_grad
    same, none = truncated_importance_weights(trainer, trainer, cap=3.0)
    assert torch.equal(same, torch.ones_like(trainer)) and not none.any()  # an exact sampler changes nothing


def test_importance_weights_remove_a_biased_samplers_bias_from_the_policy_gradient():
    """Tokens drawn from a sampler q that is not the trainer's pi: the expected gradient of the
    clipped loss over q's samples, weighted by min(pi / q, cap), equals the true gradient of
    E_pi[reward]; unweighted it does not. Expectations are exact sums over the 5 tokens."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0])
    q = torch.softmax(logits.detach() + torch.tensor([-1.0, 0.8, 0.0, -0.6, 0.9]), -1)  # a biased sampler
    (true,) = torch.autograd.grad((torch.softmax(logits, -1) * reward).sum(), logits)

    def expected_gradient(weighted: bool) -> torch.Tensor:
        logp = torch.log_softmax(logits, -1)
        loss, _ = clipped_policy_loss(logp, logp.detach(), reward, clip=0.2)  # first update: ratio 1
        if weighted:
            loss = loss * truncated_importance_weights(logp.detach(), q.log(), cap=10.0)[0]
        (gradient,) = torch.autograd.grad((q * loss).sum(), logits)
        return -gradient  # the loss is minimised: its negative gradient ascends the reward

    assert torch.allclose(expected_gradient(weighted=True), true, atol=1e-6)
    assert (expected_gradient(weighted=False) - true).norm() > 0.3 * true.norm()


def test_per_token_rewards_approx_kl_and_loss_aggregation_by_hand():
    from align.losses import aggregate_loss, approx_kl, per_token_rewards

    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = per_token_rewards(kl, torch.tensor([1.0, -2.0]), mask, kl_coef=0.5)
    # -0.5 x KL everywhere; the score lands on each row's last real token (2 and 0)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.25, 0.0, 0.0]]))
    logp, old = torch.tensor([[0.0, -1.0, 0.0], [-2.0, 5.0, 5.0]]), torch.zeros(2, 3)
    # squared log-ratios on real tokens: 0, 1, 0, 4 -> 0.5 x 5 / 4
    assert approx_kl(logp, old, mask).item() == pytest.approx(0.625)
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    assert aggregate_loss(losses, mask, "token", 2, 4, 3).item() == pytest.approx(10 / 4)  # (1+2+3+4) / 4 tokens
    assert aggregate_loss(losses, mask, "sequence", 2, 4, 3).item() == pytest.approx((2 + 4) / 2)  # row means 2, 4
    assert aggregate_loss(losses, mask, "constant", 2, 4, 3).item() == pytest.approx(10 / 6)  # / (2 rows x 3)
    # a micro-batch's share: the two rows scored apart add up to the whole minibatch's loss
    apart = sum(aggregate_loss(losses[i : i + 1], mask[i : i + 1], "token", 2, 4, 3) for i in range(2))
    assert apart.item() == pytest.approx(10 / 4)
