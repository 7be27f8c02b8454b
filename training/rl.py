"""What the RL stages share: prompt data, batched KV-cache rollouts, rewards, per-token log-probs and the k3 KL.

Prompts come from rlaif records (MiniMind's SFT-style record whose last message is a placeholder assistant turn; an
optional ``gt``/``answer`` field carries expected answers). They are rendered with the chat template and a generation
prompt, thinking opened with probability ``thinking_ratio``, kept in the token cache and left-padded per batch.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from . import rows
from .model import frozen_copy
from .spec import Explained, gettext_noop
from .tokenizer import EOS_ID, PAD_ID

REWARD_KINDS = ("rule", "exact", "contains", "numeric", "regex", "model")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def setup(spec: dict, model, tok):
    """What every RL stage starts with: (prompt rows, frozen reference, reward mix). ``data.record(i)`` is prompt
    ``i``'s expected answers and question."""
    from .loop import pick_device

    device = pick_device(spec["device"])
    data = rows.load(spec, tok, processing="rl")
    return data, frozen_copy(model, device), Rewards(spec["config"], device)


def unwrap(model):
    return getattr(model, "module", model)


@torch.no_grad()
def generate_kwargs(model) -> dict:
    """On CUDA a static KV cache, with which transformers compiles the decoding step (CUDA graphs): a small model's
    rollout is otherwise bound by the Python overhead of each generated token."""
    return {"cache_implementation": "static"} if model.device.type == "cuda" else {}


def rollout(model, prompts: torch.Tensor, n: int, max_new_tokens: int, temperature: float, top_p: float):
    """Sample ``n`` completions per prompt with KV-cache generation.

    Returns (sequences [B·n, P+G], attention mask, prompt width P, completion mask [B·n, G]: tokens up to and
    including the first eos). Left padding is trimmed to the longest prompt (on CUDA to a multiple of 64 columns,
    so that the compiled decoding step sees few shapes).
    """
    real = prompts != PAD_ID
    first = int(real.any(0).nonzero()[0])
    if prompts.device.type == "cuda":
        first = max(prompts.shape[1] - -(-(prompts.shape[1] - first) // 64) * 64, 0)
    prompts, real = prompts[:, first:], real[:, first:]
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=prompts, attention_mask=real.long(), do_sample=True, temperature=temperature,
                         top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID, **generate_kwargs(model))
    model.train(was_training)
    width = prompts.shape[1]
    completion = out[:, width:]
    is_eos = completion == EOS_ID
    cmask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    mask = torch.cat([real.repeat_interleave(n, 0), cmask], dim=1)
    return out, mask, width, cmask


def token_logps(model, seq, mask, width):
    """Log-probs of the completion tokens (positions ≥ width) under ``model``; position ids follow the mask."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seq, attention_mask=mask.long(), position_ids=pos).logits[:, width - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, seq[:, width:, None]).squeeze(-1)


def k3(ref_logp, logp):
    """The k3 estimator of KL(π ‖ ref) per token: exp(ref−π) − (ref−π) − 1 (zero when π = ref)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def masked_mean(values, mask, dim=None):
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum().clamp(min=1)
    return (values * m).sum(dim) / m.sum(dim).clamp(min=1)


# --- rewards ---------------------------------------------------------------------------------------------------

def split_answer(text: str) -> tuple[str | None, str]:
    if "</think>" in text:
        think, answer = text.rsplit("</think>", 1)
        return think.replace("<think>", ""), answer.strip()
    return None, text.strip()


def repetition_penalty(text: str) -> float:
    """Share of repeated word trigrams, capped at 0.5."""
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return 0.0
    return min(0.5, 1.0 - len(set(grams)) / len(grams))


def rule_reward(text: str) -> float:
    """MiniMind's rule reward: length window, think-block format, trigram-repetition penalty."""
    r = 0.5 if 20 <= len(text.strip()) <= 800 else -0.5
    think, answer = split_answer(text)
    if think is not None:
        r += 1.0 if 20 <= len(think.strip()) <= 300 else -0.5
        r += 0.25 if text.count("</think>") == 1 else -0.25
    return r - repetition_penalty(answer)


def _norm(s: str) -> str:
    return " ".join(s.strip().rstrip(".。!！").split()).lower()


def match_rewards(text: str, gts: list[str], regex: str = "") -> dict:
    _, answer = split_answer(text)
    nums = _NUMBER.findall(answer)
    numeric = 0.0
    if nums:
        for g in gts:
            try:
                numeric = max(numeric, float(math.isclose(float(nums[-1]), float(g), rel_tol=0, abs_tol=1e-6)))
            except ValueError:
                pass
    return {"exact": float(any(_norm(answer) == _norm(g) for g in gts)),
            "contains": float(any(g and g in answer for g in gts)), "numeric": numeric,
            "regex": float(bool(regex) and re.search(regex, answer) is not None)}


class RewardModel:
    """A local Hugging Face sequence-classification model scoring (question, answer), clipped to [-3, 3]."""

    def __init__(self, path: str, device: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise Explained(gettext_noop("reward_model_path: not a local model folder: %(path)s"), path=str(path))
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def score(self, questions: list[str], answers: list[str]) -> list[float]:
        if getattr(self.tok, "chat_template", None):
            texts = [self.tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                  tokenize=False) for q, a in zip(questions, answers)]
        else:
            texts = [f"{q}\n{a}" for q, a in zip(questions, answers)]
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=1024).to(self.device)
        logits = self.model(**enc).logits
        return logits[:, 0].float().clamp(-3, 3).tolist()


class Rewards:
    """The job's weighted reward mix (config ``rewards``: kind → weight)."""

    def __init__(self, cfg: dict, device: str):
        self.weights = {k: float(v) for k, v in cfg["rewards"].items() if float(v) != 0.0}
        self.regex = cfg["reward_regex"]
        self.model = RewardModel(cfg["reward_model_path"], device) if "model" in self.weights else None

    def __call__(self, texts: list[str], records: list[dict]) -> tuple[torch.Tensor, dict]:
        parts = {k: [] for k in self.weights}
        for text, rec in zip(texts, records):
            matched = match_rewards(text, rec["gt"], self.regex)
            for k in self.weights:
                if k == "rule":
                    parts[k].append(rule_reward(text))
                elif k != "model":
                    parts[k].append(matched[k])
        if self.model is not None:
            questions = [r["question"] for r in records]
            parts["model"] = self.model.score(questions, [split_answer(t)[1] for t in texts])
        total = torch.zeros(len(texts))
        for k, w in self.weights.items():
            total += w * torch.tensor(parts[k], dtype=torch.float)
        return total, {f"reward_{k}": sum(v) / len(v) for k, v in parts.items()}


def decode(tok, seq, width, cmask) -> list[str]:
    return [tok.decode(row[:int(m.sum())].tolist(), skip_special_tokens=True)
            for row, m in zip(seq[:, width:], cmask)]


def sample_event(tok, prompts, texts, rewards, step):
    from . import events

    prompt = tok.decode([t for t in prompts[0].tolist() if t != PAD_ID], skip_special_tokens=False)
    events.emit("sample", step=step, prompt=prompt, response=texts[0], reward=float(rewards[0]))


