"""GRPO/CISPO and PPO end to end on tiny models: rewards rise, resume is exact, bad reward specs are refused."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from training.chat import load_hf_tokenizer
from training.generate import heldout_tasks
from training.model import load_model
from training.rl import decode, match_rewards, rollout
from training.spec import SpecError, resolve_config

from .conftest import ARCH, ROOT, TINY, run_inprocess

# A verifiable format reward a tiny model can learn in a few CPU steps: the answer ends with a Chinese full stop.
REGEX = {"rewards": {"regex": 1.0}, "reward_regex": "。$"}
RL = {"batch_size": 16, "max_gen_len": 24, "temperature": 0.6, "thinking_ratio": 0.0, "system_prompt_ratio": 0.0,
      "log_interval": 1, "debug_interval": 5, "epochs": 3, "learning_rate": 3e-4}


def rl_spec(stage, demo_dir, tmp_path, base, **config):
    return {"stage": stage, "run_dir": str(tmp_path / stage), "dataset": str(demo_dir / "demo-rlaif.jsonl"),
            "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu",
            "base_model": {"path": base, "config": ARCH},
            "config": {**{k: TINY[k] for k in ("dtype",)}, **RL, **REGEX, **config}}


def sampled_reward(model_path, tok, questions, score, n=4, temperature=0.6):
    """The mean of ``score(reply, question index)`` over ``n`` sampled replies to each question (seeded rollouts)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model = load_model({"path": model_path, "config": ARCH})[0]
    torch.manual_seed(0)
    seq, mask, width, cmask = rollout(model, enc["input_ids"], n, 24, temperature, 1.0)
    outs = decode(tok, seq, width, cmask)  # the n replies to each question, one question after another
    return sum(score(o, i // n) for i, o in enumerate(outs)) / len(outs)


def heldout_reward(model_path, tok, regex="。$", n=4):
    questions = [q for q, _ in heldout_tasks(100, seed=4242)]
    return sampled_reward(model_path, tok, questions, lambda o, _: match_rewards(o, [], regex)["regex"], n)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
def test_grpo_raises_the_reward_on_heldout_prompts(trained, demo_dir, tmp_path, capsys, loss_type):
    """The regex reward on 100 held-out prompts rises by more than 0.2. At 3e-4 for 30 steps it rose 0.20 -> 0.375 on
    a machine with AVX-512/AMX kernels (2026-12-03), short of the bar by a rounding's luck. At 1e-3 for 15 steps the
    held-out reward reached 0.81 there, but on an AMD EPYC machine (2026-12-06) 0.27 / 0.44 / 0.77 / 0.99 for seeds
    42 / 1 / 2 / 3 (the sampled reward rose, collapsed, and rose again); at 2e-3 it reached 0.99-1.0 for all four."""
    spec = rl_spec("grpo", demo_dir, tmp_path, trained["sft"], max_steps=15, num_generations=8, loss_type=loss_type,
                   learning_rate=2e-3)
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    steps = [e["metrics"] for e in events if e["event"] == "step"]
    for key in ("reward", "reward_regex", "kl_ref", "advantages_std", "advantages_mean", "policy_loss",
                "avg_response_len", "lr"):
        assert key in steps[-1]
    assert steps[0]["kl_ref"] == 0.0  # the policy starts equal to the reference
    assert any(e["event"] == "sample" and "response" in e for e in events)
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    before, after = heldout_reward(trained["sft"], tok), heldout_reward(events[-1]["model_path"], tok)
    assert after > before + 0.2, (before, after)


def test_ppo_raises_the_reward_and_saves_only_the_actor(trained, demo_dir, tmp_path, capsys):
    spec = rl_spec("ppo", demo_dir, tmp_path, trained["sft"], max_steps=40, mini_batch_size=8,
                   critic_learning_rate=1e-3)
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    steps = [e["metrics"] for e in events if e["event"] == "step"]
    for key in ("reward", "kl_ref", "approx_kl", "clipfrac", "critic_loss", "avg_response_len"):
        assert key in steps[-1]
    first = sum(s["reward"] for s in steps[:5]) / 5
    last = sum(s["reward"] for s in steps[-5:]) / 5
    assert last > first + 0.3, (first, last)
    sd = torch.load(events[-1]["model_path"], weights_only=True)
    assert sorted(sd) == sorted(torch.load(trained["sft"], weights_only=True))  # actor only, MiniMind layout
    ck = torch.load(tmp_path / "ppo" / "checkpoints" / "resume.pt", weights_only=False)
    assert any(k.startswith("critic.") for k in ck["model"]) and "value_head.weight" in ck["model"]


@pytest.mark.slow
def test_grpo_stopped_and_resumed_matches_an_uninterrupted_run(trained, demo_dir, tmp_path):
    def run(name, stop_at=None, resume=False):
        spec = rl_spec("grpo", demo_dir, tmp_path / name, trained["sft"], max_steps=6, num_generations=4,
                       batch_size=4, save_interval=1000)
        spec["resume"] = resume
        path = tmp_path / f"{name}.json"
        (tmp_path / name).mkdir(exist_ok=True)
        path.write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, "-u", "-m", "training", "run", str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if stop_at and events[-1]["event"] == "step" and events[-1]["step"] == stop_at:
                proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=120), events

    rc, straight = run("a")
    assert rc == 0
    rc, first = run("b", stop_at=3)
    assert rc == 143
    rc, second = run("b", resume=True)
    assert rc == 0
    metrics = lambda evs: {e["step"]: (e["metrics"]["reward"], e["metrics"]["policy_loss"])  # noqa: E731
                           for e in evs if e["event"] == "step"}
    resumed = {**metrics(first), **metrics(second)}
    assert resumed == metrics(straight)


def test_reward_specs_are_checked():
    with pytest.raises(SpecError) as exc:
        resolve_config("grpo", {"rewards": {"vibes": 1.0}})
    assert exc.value.field == "rewards"
    with pytest.raises(SpecError) as exc:
        resolve_config("grpo", {"rewards": {"regex": 1.0}})
    assert exc.value.field == "reward_regex"
    with pytest.raises(SpecError) as exc:
        resolve_config("ppo", {"reward_regex": "("})
    assert exc.value.field == "reward_regex"
    with pytest.raises(SpecError) as exc:
        resolve_config("grpo", {"loss_type": "ppo"})
    assert exc.value.field == "loss_type"
    assert resolve_config("grpo", {})["loss_type"] == "cispo"


def test_ppo_refuses_accumulation_and_halves_its_batch_without_it():
    """PPO steps its optimizer on every mini-batch of a rollout, so accumulation would only cut its epoch short."""
    from training.spec import halved_batch

    with pytest.raises(SpecError) as exc:
        resolve_config("ppo", {"accumulation_steps": 2})
    assert exc.value.field == "accumulation_steps"
    assert halved_batch("ppo", resolve_config("ppo", {"batch_size": 4})) == {"batch_size": 2, "accumulation_steps": 1}
    assert halved_batch("grpo", resolve_config("grpo", {"batch_size": 4})) == {"batch_size": 2,
                                                                                "accumulation_steps": 2}


@pytest.mark.slow
def test_grpo_with_a_verifiable_reward_raises_the_accuracy_of_its_answers(trained, demo_dir, tmp_path, capsys):
    """Prompts with their expected answers (rlaif ``gt``) and the ``exact`` reward: after GRPO the model's sampled
    answers to its prompts ("Copy the word W twice.", 14 of the demo words) are right more often than the SFT
    model's (0.10 -> 0.28 in 40 steps here, the logged reward 0.18 -> 0.45). The rollouts stop at 8 tokens (each
    right answer is 2 and its end): uncut at 24 the same run learnt as much (0.10 -> 0.29) in twice the time. What
    the tiny model does not learn in CPU minutes, so no test asks it: addition by RL (the numeric reward over the
    0..20 table moved 35 -> 36 greedy right answers in 60 steps, its logged reward flat at ~0.05; on other CPU
    kernels 32 -> 30), nor copying the words it never trained on (held-out sampled accuracy 0.08 -> 0.02: it learns
    its prompts, not the skill)."""
    import random

    from training.demo_data import WORDS

    words = WORDS[:14]
    rng = random.Random(5)
    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"Copy the word {w} twice."},
                                                          {"role": "assistant", "content": "n/a"}],
                                        "gt": [f"{w} {w}"]}) + "\n" for w in (rng.choice(words) for _ in range(400))))
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")

    def accuracy(path):
        return sampled_reward(path, tok, [f"Copy the word {w} twice." for w in words],
                              lambda reply, i: match_rewards(reply, [f"{words[i]} {words[i]}"])["exact"], n=16,
                              temperature=0.8)

    spec = rl_spec("grpo", demo_dir, tmp_path, trained["sft"], max_steps=40, num_generations=8, temperature=0.8,
                   max_gen_len=8, rewards={"exact": 1.0}, reward_regex="", log_interval=5, learning_rate=1e-3)
    spec["dataset"] = str(data)
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    logged = [e["metrics"]["reward"] for e in events if e["event"] == "step"]
    assert all("reward_exact" in e["metrics"] for e in events if e["event"] == "step")
    assert sum(logged[-2:]) / 2 > sum(logged[:2]) / 2 + 0.1, logged
    before, after = accuracy(trained["sft"]), accuracy(events[-1]["model_path"])
    assert after > before + 0.08, (before, after)


def test_a_left_padded_rollout_is_the_same_as_its_prompt_alone():
    """A batch of rollouts left-pads its shorter prompts. The engine's attention implementation had no mask function
    registered, so transformers dropped the padding mask and a short prompt's completion attended to the padding:
    its log-probs differed by ~0.1 from the prompt alone (GRPO/PPO learned from them, the eval's batched answers were
    made so). Now the padded row equals the row alone, in the log-probs and in a greedy completion."""
    from training.model import build_model
    from training.rl import token_logps
    from training.spec import model_config
    from training.tokenizer import EOS_ID, PAD_ID

    torch.manual_seed(0)
    model = build_model(model_config(resolve_config("pretrain", dict(ARCH)))).eval()
    short, long = torch.randint(5, 100, (1, 5)), torch.randint(5, 100, (1, 12))
    batch = torch.cat([torch.cat([torch.full((1, 7), PAD_ID), short], 1), long])
    mask = batch != PAD_ID
    mask[1] = True
    with torch.no_grad():
        greedy = dict(do_sample=False, max_new_tokens=6, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        together = model.generate(input_ids=batch, attention_mask=mask.long(), **greedy)
        alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), **greedy)
        assert torch.equal(together[0, 12:], alone[0, 5:])
        full_mask = torch.cat([mask, torch.ones_like(together[:, 12:], dtype=torch.bool)], 1)
        padded = token_logps(model, together, full_mask, 12)[0]
        single = token_logps(model, alone, torch.ones_like(alone, dtype=torch.bool), 5)[0]
    assert torch.allclose(padded, single, atol=1e-5), (padded - single).abs().max()
