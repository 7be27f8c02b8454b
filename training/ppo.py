"""PPO (MiniMind's train_ppo.py): one completion per prompt, a critic, GAE, clipped policy and value losses.

The critic is a copy of the policy's transformer body with a scalar ``value_head``. The reward sits on the last
response token; advantages come from GAE over the critic's values (γ, λ) and are whitened over the response tokens.
Each rollout batch gets ``ppo_update_iters`` passes in minibatches of ``mini_batch_size``:
  policy = clipped surrogate + kl_coef·k3(ref),  value = 0.5·max((V−R)², (V_clip−R)²),
  loss = policy + vf_coef·value (+ MoE aux),
stopping early when the approximate KL 0.5·mean((π−π_old)²) exceeds ``early_stop_kl``. Only the actor is saved.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .loop import default_save, train
from .model import aux_loss
from .rl import decode, k3, masked_mean, rollout, sample_event, setup, token_logps


class ActorCritic(nn.Module):
    def __init__(self, actor):
        super().__init__()
        self.actor = actor
        self.critic = copy.deepcopy(actor.model)
        self.value_head = nn.Linear(actor.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)

    def values(self, seq, mask, width):
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.critic(input_ids=seq, attention_mask=mask.long(), position_ids=pos).last_hidden_state
        return self.value_head(hidden[:, width - 1:-1]).squeeze(-1).float()


def gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns; ``rewards`` [B, T] (the reward on each response's last token), masks end episodes."""
    m = mask.float()
    values = values * m
    adv = torch.zeros_like(values)
    last = torch.zeros(values.shape[0], device=values.device)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(values, mask):
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask.float()


def ppo_losses(logp, old_logp, ref_logp, adv, new_v, old_v, returns, mask, cfg):
    """(policy loss, value loss, approx KL, clip fraction) on one minibatch."""
    ratio = torch.exp(logp - old_logp)
    eps = cfg["clip_epsilon"]
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    policy = masked_mean(surrogate + cfg["kl_coef"] * k3(ref_logp, logp), mask)
    clipped_v = old_v + torch.clamp(new_v - old_v, -cfg["cliprange_value"], cfg["cliprange_value"])
    value = 0.5 * masked_mean(torch.max((new_v - returns) ** 2, (clipped_v - returns) ** 2), mask)
    approx_kl = 0.5 * masked_mean((logp - old_logp) ** 2, mask)
    clipfrac = masked_mean(((ratio - 1).abs() > eps).float(), mask)
    return policy, value, approx_kl, clipfrac


def run(spec: dict, model, tok):
    cfg = spec["config"]
    data, reference, rewards = setup(spec, model, tok)
    ac = ActorCritic(model)
    calls = {"n": 0}

    def update(ac, batch, opt_step):
        actor = ac.actor
        seq, mask, width, cmask = rollout(actor, batch["x"], 1, cfg["max_gen_len"], cfg["temperature"], cfg["top_p"])
        texts = decode(tok, seq, width, cmask)
        reward, reward_parts = rewards(texts, [data.record(i) for i in batch["idx"].tolist()])
        with torch.no_grad():
            old_logp = token_logps(actor, seq, mask, width)
            ref_logp = token_logps(reference, seq, mask, width)
            old_v = ac.values(seq, mask, width)
            token_reward = torch.zeros_like(old_v)
            last = (cmask.sum(1) - 1).clamp(min=0)
            token_reward[torch.arange(len(last)), last] = reward.to(old_v.device)
            adv, returns = gae(token_reward, old_v, cmask, cfg["gamma"], cfg["lam"])
            adv = whiten(adv, cmask)
        stats = {"loss": [], "critic_loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        stop = False
        for _ in range(cfg["ppo_update_iters"]):
            order = torch.randperm(len(seq))
            for i in range(0, len(seq), cfg["mini_batch_size"]):
                mb = order[i:i + cfg["mini_batch_size"]].to(seq.device)
                logp = token_logps(actor, seq[mb], mask[mb], width)
                new_v = ac.values(seq[mb], mask[mb], width)
                policy, value, approx_kl, clipfrac = ppo_losses(logp, old_logp[mb], ref_logp[mb], adv[mb], new_v,
                                                                old_v[mb], returns[mb], cmask[mb], cfg)
                aux = aux_loss(actor)
                loss = policy + cfg["vf_coef"] * value + (aux if aux is not None else 0)
                stats["grad_norm"].append(opt_step(loss))
                for k, v in (("loss", loss), ("critic_loss", value), ("approx_kl", approx_kl),
                             ("clipfrac", clipfrac)):
                    stats[k].append(v.item())
                if approx_kl.item() > cfg["early_stop_kl"]:
                    stop = True
                    break
            if stop:
                break
        calls["n"] += 1
        if calls["n"] % cfg["debug_interval"] == 0 or calls["n"] == 1:
            sample_event(tok, batch["x"], texts, reward, calls["n"])
        mean = {k: sum(v) / len(v) for k, v in stats.items()}
        return {**mean, "reward": reward.mean().item(), **reward_parts,
                "kl_ref": masked_mean(k3(ref_logp, old_logp), cmask).item(),
                "avg_response_len": cmask.sum(1).float().mean().item(), "early_stopped": float(stop),
                "tokens": int(cmask.sum())}

    groups = [{"params": list(ac.actor.parameters())},
              {"params": list(ac.critic.parameters()) + list(ac.value_head.parameters()),
               "lr_scale": cfg["critic_learning_rate"] / cfg["learning_rate"]}]
    return train(spec, ac, data, params=groups, update=update, save_fn=_save_actor,
                 stage_extra={"prompts": len(data)})


def _save_actor(ac, run_dir):
    return default_save(ac.actor, run_dir)
