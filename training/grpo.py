"""GRPO and CISPO (MiniMind's train_grpo.py; ``loss_type`` cispo is MiniMind's default).

Per prompt, ``num_generations`` completions are sampled; advantages are the rewards normalised within the group,
(r − mean) / (population std + 1e-4). Per token, with ρ = exp(π − π_old) and k3 the KL estimator to the frozen
reference:
  grpo:  −(min(ρA, clip(ρ, 1−ε, 1+ε)A) − β·k3)
  cispo: −(min(ρ, ε_high).detach()·A·log π − β·k3)
averaged over each completion's tokens (up to and including the first eos), then over the batch, + MoE aux.
"""
from __future__ import annotations

import torch

from .loop import train
from .model import aux_loss
from .rl import decode, k3, masked_mean, rollout, sample_event, setup, token_logps, unwrap


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def policy_loss(logp, old_logp, ref_logp, adv, mask, loss_type: str, beta: float, eps: float, eps_high: float):
    """(loss, per-token k3) for GRPO or CISPO."""
    kl = k3(ref_logp, logp)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    if loss_type == "grpo":
        per_token = -(torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a) - beta * kl)
    else:
        per_token = -(torch.clamp(ratio, max=eps_high).detach() * a * logp - beta * kl)
    return masked_mean(per_token, mask, dim=1).mean(), kl


def run(spec: dict, model, tok):
    cfg = spec["config"]
    data, reference, rewards = setup(spec, model, tok)
    group = cfg["num_generations"]
    calls = {"n": 0}

    def loss_fn(model, batch):
        core = unwrap(model)
        seq, mask, width, cmask = rollout(core, batch["x"], group, cfg["max_gen_len"], cfg["temperature"],
                                          cfg["top_p"])
        texts = decode(tok, seq, width, cmask)
        recs = [data.record(i) for i in batch["idx"].tolist() for _ in range(group)]
        reward, reward_parts = rewards(texts, recs)
        adv = group_advantages(reward, group).to(seq.device)
        logp = token_logps(model, seq, mask, width)
        with torch.no_grad():
            ref_logp = token_logps(reference, seq, mask, width)
        loss, kl = policy_loss(logp, logp.detach(), ref_logp, adv, cmask, cfg["loss_type"], cfg["beta"],
                               cfg["epsilon"], cfg["epsilon_high"])
        aux = aux_loss(model)
        calls["n"] += 1
        if calls["n"] % cfg["debug_interval"] == 0 or calls["n"] == 1:
            sample_event(tok, batch["x"], texts, reward, calls["n"])
        parts = {"reward": reward.mean().item(), **reward_parts, "kl_ref": masked_mean(kl.detach(), cmask).item(),
                 "advantages_std": adv.std(unbiased=False).item(), "advantages_mean": adv.mean().item(),
                 "policy_loss": loss.item(), "avg_response_len": cmask.sum(1).float().mean().item(),
                 "aux_loss": aux.item() if aux is not None else 0.0, "tokens": int(cmask.sum())}
        return (loss + aux if aux is not None else loss), parts

    return train(spec, model, data, loss_fn, stage_extra={"prompts": len(data), "num_generations": group})
