"""RL building blocks against values computed by hand on tiny fixed batches."""
import math

import pytest
import torch

from training.grpo import group_advantages, policy_loss
from training.ppo import gae, ppo_losses, whiten
from training.rl import k3, match_rewards, repetition_penalty, rule_reward


def test_k3_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert torch.equal(k3(logp, logp), torch.zeros_like(logp))
    d = -0.3  # ref - pi
    assert k3(logp + d, logp)[0, 0].item() == pytest.approx(math.exp(d) - d - 1)
    assert (k3(logp + 0.2, logp) > 0).all()


def test_group_advantages_are_normalised_within_each_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    std = 0.5  # population std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4),
                                                                                               0.5 / (std + 1e-4)])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal


def _batch():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]])
    old = torch.tensor([[-1.1, -1.7, -3.0], [-0.5, -1.0, -9.0]])
    ref = torch.tensor([[-1.2, -2.0, -2.5], [-0.4, -1.5, -9.0]])
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_grpo_and_cispo_losses_equal_hand_computed(loss_type):
    logp, old, ref, adv, mask = _batch()
    beta, eps, eps_high = 0.1, 0.2, 5.0
    per_seq = []
    for i in range(2):
        terms = []
        for t in range(3):
            if not mask[i, t]:
                continue
            lp, o, r, a = logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item()
            ratio = math.exp(lp - o)
            kl = math.exp(r - lp) - (r - lp) - 1
            if loss_type == "grpo":
                terms.append(-(min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a) - beta * kl))
            else:
                terms.append(-(min(ratio, eps_high) * a * lp - beta * kl))
        per_seq.append(sum(terms) / len(terms))
    loss, _ = policy_loss(logp, old, ref, adv, mask, loss_type, beta, eps, eps_high)
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)


def test_cispo_gradient_flows_through_log_pi_only():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0]), torch.tensor([[True, True]]),
                          "cispo", 0.0, 0.2, 5.0)
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, -1.0]]  # −A·ρ/|tokens| with ρ = 1, A = 2


def test_gae_and_whitening_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.75]])
    mask = torch.tensor([[True, True, True]])
    gamma, lam = 1.0, 0.95
    d2 = 1.0 - 0.75
    d1 = 0.0 + 0.75 - 0.25
    d0 = 0.0 + 0.25 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.25, a2 + 0.75])
    w = whiten(adv, mask)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-6) and w.std(unbiased=False).item() == pytest.approx(1, 1e-4)


def test_ppo_losses_equal_hand_computed():
    logp, old, ref, _, mask = _batch()
    adv = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, 3.0]])
    new_v = torch.tensor([[0.2, 0.4, 0.9], [0.1, 0.0, 5.0]])
    old_v = torch.tensor([[0.0, 0.5, 0.5], [0.3, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 0.0]])
    cfg = {"clip_epsilon": 0.2, "kl_coef": 0.02, "cliprange_value": 0.2}
    pol, val, kl, clip, n = 0.0, 0.0, 0.0, 0.0, 0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            lp, o, r, a = logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i, t].item()
            ratio = math.exp(lp - o)
            pol += -min(ratio * a, min(max(ratio, 0.8), 1.2) * a) + 0.02 * (math.exp(r - lp) - (r - lp) - 1)
            v, ov, rt = new_v[i, t].item(), old_v[i, t].item(), ret[i, t].item()
            vc = ov + min(max(v - ov, -0.2), 0.2)
            val += max((v - rt) ** 2, (vc - rt) ** 2)
            kl += (lp - o) ** 2
            clip += abs(ratio - 1) > 0.2
            n += 1
    got = ppo_losses(logp, old, ref, adv, new_v, old_v, ret, mask, cfg)
    assert [x.item() for x in got] == pytest.approx([pol / n, 0.5 * val / n, 0.5 * kl / n, clip / n], rel=1e-5)


def test_rewards():
    assert rule_reward("short") == -0.5
    assert rule_reward("A sufficiently long answer, with detail.") == 0.5
    good_think = "<think>\nI add the two numbers together carefully.\n</think>\n\nThe answer is twenty-one."
    assert rule_reward(good_think) == pytest.approx(0.5 + 1.0 + 0.25)
    assert repetition_penalty("a b c a b c a b c a b c") == 0.5
    m = match_rewards("<think>\nx\n</think>\n\n10 plus 11 is 21.", ["21"], r"is \d+")
    assert m == {"exact": 0.0, "contains": 1.0, "numeric": 1.0, "regex": 1.0}
    assert match_rewards("21.", ["21"])["exact"] == 1.0
    assert match_rewards("about 20", ["21"])["numeric"] == 0.0


def test_reward_model_from_a_local_sequence_classification_folder(demo_dir, tmp_path):
    import shutil

    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from training.rl import Rewards

    cfg = Qwen3Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = Qwen3ForSequenceClassification(cfg)
    with torch.no_grad():
        rm.score.weight.mul_(1000)  # large scores, to see the clipping
    rm.save_pretrained(tmp_path / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / "demo-tokenizer" / name, tmp_path / "rm" / name)
    rewards = Rewards({"rewards": {"model": 1.0, "contains": 0.5}, "reward_regex": "",
                       "reward_model_path": str(tmp_path / "rm")}, "cpu")
    recs = [{"gt": ["4"], "question": "What is 2 plus 2?"}] * 2  # what the token cache keeps of an RL record
    total, parts = rewards(["2 plus 2 is 4.", "It is five."], recs)
    assert set(parts) == {"reward_model", "reward_contains"}
    scores = rewards.model.score(["What is 2 plus 2?"] * 2, ["2 plus 2 is 4.", "It is five."])
    assert all(-3 <= s <= 3 for s in scores) and any(abs(s) == 3 for s in scores)
    assert total.tolist() == pytest.approx([scores[0] + 0.5, scores[1]])
