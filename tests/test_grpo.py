"""GRPO: advantages, the clipped objective and its aggregations, the KL estimator, rollouts."""

import math

import pytest
import torch

from moxin.losses import IGNORE_INDEX, group_advantages, grpo_policy_loss, kl_k3, token_logps_and_entropy
from moxin.model import ModelConfig
from moxin.modules import GRPOConfig, GRPOModule, OptimConfig
from moxin.tokenizer import load_tokenizer


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)  # mean 0.5, std 0.5
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no advantage
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    assert torch.allclose(adv[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / std, atol=1e-5)
    assert torch.allclose(group_advantages(rewards, scale=False)[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_equal_rewards_give_zero_policy_gradient():
    logps = torch.randn(4, 5, requires_grad=True)
    advantages = group_advantages(torch.full((1, 4), 5.0)).view(-1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    for aggregation in ("grpo", "dapo", "dr_grpo"):
        loss, _ = grpo_policy_loss(logps, logps.detach() + 0.1, advantages, mask, aggregation=aggregation,
                                   max_tokens=8)
        (grad,) = torch.autograd.grad(loss, logps)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_clipped_objective_by_hand():
    # One sequence of three tokens; ratios 1.5, 0.5 and 1.1 against advantage +1, then -1.
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = grpo_policy_loss(logps, old, torch.tensor([1.0]), mask, clip_low=0.2)
    # A > 0: min(r, clip(r)) = 1.2 (clipped), 0.5, 1.1 -> -(1.2 + 0.5 + 1.1) / 3
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad[0, 0] == 0  # the clipped token carries no gradient
    assert grad[0, 1].item() == pytest.approx(-0.5 / 3)  # d(-r/3)/dlogp = -r/3
    loss, stats = grpo_policy_loss(logps, old, torch.tensor([-1.0]), mask, clip_low=0.2)
    # A < 0: min(-r, -clip(r)) = -1.5, -0.8 (clipped), -1.1 -> (1.5 + 0.8 + 1.1) / 3
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    # Clip-higher: a wider upper bound keeps 1.5 unclipped for A > 0.
    loss, _ = grpo_policy_loss(logps, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx(-(1.5 + 0.5 + 1.1) / 3)


def test_aggregations_by_hand():
    # Ratio 1 everywhere: each token's loss is -A. Sequence 1 has 1 token (A = 2), sequence 2 has 3 (A = -1).
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    advantages = torch.tensor([2.0, -1.0])
    grpo, _ = grpo_policy_loss(logps, logps, advantages, mask, aggregation="grpo")
    assert grpo.item() == pytest.approx((-2.0 + 1.0) / 2)  # per-sequence means, then their mean
    dapo, _ = grpo_policy_loss(logps, logps, advantages, mask, aggregation="dapo")
    assert dapo.item() == pytest.approx((-2.0 + 3 * 1.0) / 4)  # over all four tokens
    dr, _ = grpo_policy_loss(logps, logps, advantages, mask, aggregation="dr_grpo", max_tokens=10)
    assert dr.item() == pytest.approx((-2.0 + 3.0) / (2 * 10))  # a constant normaliser
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_policy_loss(logps, logps, advantages, mask, aggregation="dr_grpo")
    # The KL term adds beta x KL per token, aggregated the same way.
    kl = torch.full((2, 3), 0.5)
    with_kl, stats = grpo_policy_loss(logps, logps, advantages, mask, aggregation="dapo", kl=kl, kl_beta=0.1)
    assert with_kl.item() == pytest.approx(dapo.item() + 0.05) and stats["kl"].item() == pytest.approx(0.5)


def test_kl_k3_estimator():
    logps = torch.tensor([-1.0, -2.0, -0.5, 0.0])
    ref = torch.tensor([-1.0, -1.0, -3.0, -30.0])
    delta = ref - logps
    expected = (delta.exp() - delta - 1)
    got = kl_k3(logps, ref)
    assert got[0] == 0  # identical policies
    assert torch.allclose(got[:3], expected[:3]) and (got >= 0).all()
    assert got[3] == 10.0  # exp(-30) + 30 - 1, clamped at +10
    assert kl_k3(torch.tensor([0.0]), torch.tensor([15.0])).item() == 10.0
    # Its mean estimates KL(pi || ref) for tokens sampled from pi.
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_k3(p.log()[samples], q.log()[samples]).mean()
    assert estimate.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_token_logps_and_entropy_match_a_full_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 4, 8), torch.randn(11, 8)
    labels = torch.tensor([[IGNORE_INDEX, 3, 5, IGNORE_INDEX], [1, 2, IGNORE_INDEX, 10]])
    logps, entropy = token_logps_and_entropy(hidden, weight, labels, entropy_rows=None)
    full = torch.log_softmax(hidden @ weight.T, dim=-1)
    valid = labels != IGNORE_INDEX
    torch.testing.assert_close(logps[valid], full[valid].gather(-1, labels[valid, None]).squeeze(-1))
    token_entropy = -(full.exp() * full).sum(-1)[valid]
    torch.testing.assert_close(entropy, token_entropy.mean())
    assert (logps[~valid] == 0).all()
    # A strided sample of the tokens: the first and the last of the five.
    torch.testing.assert_close(token_logps_and_entropy(hidden, weight, labels, entropy_rows=2)[1],
                               token_entropy[[0, 4]].mean())


def test_rollout_aligns_tokens_and_old_logps():
    """The rollout's labels are the sampled tokens at the positions that predict them, and its old
    log-probs equal a full forward pass's log-softmax there (so the first update's ratio is 1)."""
    cfg = ModelConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=16, max_seq_len=128)
    torch.manual_seed(0)
    module = GRPOModule(cfg, OptimConfig(lr=1e-4, warmup_steps=0),
                        grpo=GRPOConfig(group_size=3, max_new_tokens=6, temperature=1.0, kl_beta=0.1))
    module.set_reference(module.model.state_dict())
    module.tokenizer = load_tokenizer()
    prompts = [[1, 415, 3198], [1, 28705, 28770, 648, 28705]]
    try:
        rollout = module.rollout(prompts, ["7", "3"])
    finally:
        module.verifier.close()
    batch = rollout["batch"]
    assert batch["input_ids"].shape[0] == 6 and batch["advantages"].shape == (6,)
    mask = batch["labels"] != IGNORE_INDEX
    assert mask.sum(-1).tolist() == [int(n) for n in mask.sum(-1).tolist()]
    for row in range(6):
        prompt = prompts[row // 3]
        positions = mask[row].nonzero().squeeze(-1)
        assert positions[0].item() == len(prompt) - 1  # the prompt's last token predicts the first response token
        assert batch["input_ids"][row, :len(prompt)].tolist() == prompt
    with torch.no_grad():
        logps, _ = token_logps_and_entropy(module.model.hidden_states(batch["input_ids"]), module.model.output.weight,
                                           batch["labels"])
    torch.testing.assert_close(logps[mask], batch["old_logps"][mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["reference_logps"][mask], logps[mask], atol=1e-4, rtol=1e-4)
    loss, stats = module.policy_loss(batch)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-3) and stats["kl"].item() == pytest.approx(0, abs=1e-4)


def test_an_update_raises_rewarded_responses_and_lowers_the_others(monkeypatch):
    import moxin.modules.grpo as grpo_module

    cfg = ModelConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=16, max_seq_len=128)
    torch.manual_seed(0)
    module = GRPOModule(cfg, OptimConfig(lr=1e-4, warmup_steps=0),
                        grpo=GRPOConfig(group_size=4, max_new_tokens=5, temperature=1.0, kl_beta=0.0))
    module.tokenizer = load_tokenizer()
    # The first response of each group is the rewarded one.
    monkeypatch.setattr(grpo_module, "timed_rewards",
                        lambda kind, texts, refs, verifier: ([float(i % 4 == 0) for i in range(len(texts))],
                                                             [i % 4 == 0 for i in range(len(texts))], 0.0))
    try:
        batch = module.rollout([[1, 415, 3198], [1, 28705, 28770]], ["1", "2"])["batch"]
    finally:
        module.verifier.close()
    mask = batch["labels"] != IGNORE_INDEX

    def sequence_logps():
        hidden = module.model.hidden_states(batch["input_ids"])
        return (token_logps_and_entropy(hidden, module.model.output.weight, batch["labels"])[0] * mask).sum(-1)

    before = sequence_logps().detach()
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.05)
    for _ in range(3):
        loss, _ = module.policy_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    change = sequence_logps().detach() - before
    rewarded = torch.arange(8) % 4 == 0
    assert (change[rewarded] > 0).all() and (change[~rewarded] < 0).all()


def test_rollout_seeds_follow_the_data_parallel_rank(monkeypatch):
    """Data-parallel replicas sample different responses; the ranks of one tensor-parallel group (one
    data-parallel rank) sample the same, so that they decode in step; each step has its own seeds."""
    from types import SimpleNamespace

    import moxin.modules.grpo as grpo_module
    from moxin.generate import Generation

    seeds = []

    def recording_generate(model, prompts, max_new_tokens, seed=None, **kwargs):
        seeds.append(seed)
        return Generation(tokens=[[2] for _ in prompts], logprobs=[[0.0] for _ in prompts])

    monkeypatch.setattr(grpo_module, "generate", recording_generate)
    cfg = ModelConfig(vocab_size=32000, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=16, max_seq_len=64)
    module = GRPOModule(cfg, OptimConfig(), grpo=GRPOConfig(group_size=2, max_new_tokens=2, kl_beta=0.0))
    module.tokenizer = load_tokenizer()
    try:
        # (global rank, data-parallel rank, step): 4 processes in tensor-parallel groups of 2.
        for global_rank, data_parallel_rank, step in ((0, 0, 3), (1, 0, 3), (2, 1, 3), (0, 0, 4)):
            module._trainer = SimpleNamespace(global_step=step, global_rank=global_rank, strategy=SimpleNamespace(
                distributed_sampler_kwargs={"rank": data_parallel_rank, "num_replicas": 2}))
            module.rollout([[1, 415]], ["1"])
    finally:
        module.verifier.close()
    assert seeds[0] == seeds[1] and len({seeds[0], seeds[2], seeds[3]}) == 3
