"""GRPO throughput as JSON: rollout tokens/s and optimisation steps/s at MiniMind's defaults.

    python bench/rl_throughput.py                        # MiniMind-3 (hidden 768, 8 layers), batch 2 × 6 × 1024
    python bench/rl_throughput.py --hidden 64 --layers 2 --max-new 32 --steps 2     # CPU smoke run

A random-weight policy samples ``--generations`` completions per prompt (KV-cache generation, temperature 0.8,
``min_new_tokens`` = ``max_new_tokens`` so every step generates the full length), then takes one CISPO step against a
frozen reference, as training/grpo.py does.

    python bench/rl_throughput.py --impl minimind --minimind ~/minimind      # the reference, same shapes and prompts

``--impl minimind`` times MiniMind's own rollout path instead (a checkout of jingyaogong/minimind, never ours to
ship): its ``trainer/rollout_engine.TorchRolloutEngine.rollout`` on its ``MiniMindForCausalLM`` (fp32 weights under
bf16 autocast on CUDA, as train_grpo.py builds them), with its tokenizer, the same prompts and lengths.
``rollout_tokens_per_s`` there is its whole rollout (its ``generate``, which concatenates its KV cache each token,
then the old policy's log-probabilities and the decoding of the completions, which train_grpo.py does per step);
``generate_tokens_per_s`` its ``generate`` alone. Ours needs no separate pass for the old log-probabilities (one
policy update per rollout: they are the new ones, detached), so our rollout is our ``generate``. Tokens counted are
the completions' real tokens (up to the first eos: MiniMind's generation stops at it; a random model rarely says it).
"""
import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from training.grpo import group_advantages, policy_loss  # noqa: E402
from training.model import build_model  # noqa: E402
from training.rl import generate_kwargs, token_logps  # noqa: E402
from training.spec import model_config, resolve_config  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation of the decoding step)")
    p.add_argument("--cache", choices=["engine", "dynamic"], default="engine",
                   help="engine: the KV cache the engine uses (static and compiled on CUDA); dynamic: transformers' default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", choices=["ours", "minimind"], default="ours")
    p.add_argument("--minimind", help="a MiniMind checkout (for --impl minimind)")
    args = p.parse_args()
    is_cuda = args.device.startswith("cuda")
    mcfg = model_config(resolve_config("grpo", {"hidden_size": args.hidden, "num_hidden_layers": args.layers}))
    torch.manual_seed(0)
    prompts = torch.randint(3, mcfg["vocab_size"], (args.batch, args.prompt_len), device=args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)
    shapes = {"device": torch.cuda.get_device_name() if is_cuda else "cpu", "torch": torch.__version__,
              "hidden_size": args.hidden, "layers": args.layers, "batch": args.batch, "generations": args.generations,
              "prompt_len": args.prompt_len, "max_new_tokens": args.max_new}
    if args.impl == "minimind":
        return print(json.dumps({"impl": "minimind", **shapes, **minimind_rollouts(args, prompts, amp, is_cuda)}))
    policy = build_model(mcfg).to(args.device)
    reference = copy.deepcopy(policy).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-7, fused=is_cuda)
    gen_time = train_time = 0.0
    gen_tokens = 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            gen_time = train_time = 0.0
            gen_tokens = 0
        t0 = time.perf_counter()
        with torch.no_grad(), amp:
            policy.eval()
            seq = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                  temperature=0.8, top_k=0, max_new_tokens=args.max_new, min_new_tokens=args.max_new,
                                  num_return_sequences=args.generations, pad_token_id=0,
                                  **(generate_kwargs(policy) if args.cache == "engine" else {}))
            policy.train()
        if is_cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        mask = torch.ones_like(seq, dtype=torch.bool)
        width = prompts.shape[1]
        with amp:
            logp = token_logps(policy, seq, mask, width)
            with torch.no_grad():
                ref = token_logps(reference, seq, mask, width)
            adv = group_advantages(torch.rand(len(seq)), args.generations).to(seq.device)
            loss, _ = policy_loss(logp, logp.detach(), ref, adv, mask[:, width:], "cispo", 0.1, 0.2, 5.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if is_cuda:
            torch.cuda.synchronize()
        gen_time += t1 - t0
        train_time += time.perf_counter() - t1
        gen_tokens += (seq.shape[1] - width) * seq.shape[0]
    out = {"impl": "ours", **shapes,
           "cache": generate_kwargs(policy).get("cache_implementation", "dynamic") if args.cache == "engine" else "dynamic",
           "rollout_tokens_per_s": round(gen_tokens / gen_time, 1),
           "optimisation_steps_per_s": round(args.steps / train_time, 3),
           "grpo_steps_per_s": round(args.steps / (gen_time + train_time), 3)}
    if is_cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))


def minimind_rollouts(args, prompts, amp, is_cuda) -> dict:
    """MiniMind's rollout (``TorchRolloutEngine.rollout``, its own code from the checkout) on the same prompts."""
    sys.path.insert(0, os.path.abspath(os.path.expanduser(args.minimind)))
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer.rollout_engine import TorchRolloutEngine
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.expanduser(args.minimind), "model"))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=args.hidden, num_hidden_layers=args.layers)).to(args.device)
    engine = TorchRolloutEngine(model, tokenizer, args.device, autocast_ctx=amp)
    generate, spent = model.generate, []

    def timed_generate(*a, **kw):  # its generate's share of the rollout
        t = time.perf_counter()
        out = generate(*a, **kw)
        if is_cuda:
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - t)
        return out

    model.generate = timed_generate
    rollout_time, tokens = 0.0, 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            rollout_time, tokens, spent[:] = 0.0, 0, []
        t0 = time.perf_counter()
        result = engine.rollout(prompts, torch.ones_like(prompts), args.generations, args.max_new, temperature=0.8)
        if is_cuda:
            torch.cuda.synchronize()
        rollout_time += time.perf_counter() - t0
        eos = result.completion_ids == tokenizer.eos_token_id  # finished rows repeat eos to the end
        first = torch.where(eos.any(1), eos.int().argmax(1) + 1, torch.full_like(eos[:, 0], eos.shape[1], dtype=torch.long))
        tokens += int(first.sum())
    out = {"rollout_tokens_per_s": round(tokens / rollout_time, 1),
           "generate_tokens_per_s": round(tokens / sum(spent), 1),
           "completion_tokens_per_step": round(tokens / args.steps, 1)}
    if is_cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


if __name__ == "__main__":
    main()
