"""GRPO throughput as JSON: rollout tokens/s and optimisation steps/s at MiniMind's defaults.

    python bench/rl_throughput.py                        # MiniMind-3 (hidden 768, 8 layers), batch 2 × 6 × 1024
    python bench/rl_throughput.py --hidden 64 --layers 2 --max-new 32 --steps 2     # CPU smoke run

A random-weight policy samples ``--generations`` completions per prompt (KV-cache generation, temperature 0.8,
``min_new_tokens`` = ``max_new_tokens`` so every step generates the full length), then takes one CISPO step against a
frozen reference, as training/grpo.py does.
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
    args = p.parse_args()
    is_cuda = args.device.startswith("cuda")
    mcfg = model_config(resolve_config("grpo", {"hidden_size": args.hidden, "num_hidden_layers": args.layers}))
    torch.manual_seed(0)
    policy = build_model(mcfg).to(args.device)
    reference = copy.deepcopy(policy).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-7, fused=is_cuda)
    prompts = torch.randint(3, mcfg["vocab_size"], (args.batch, args.prompt_len), device=args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)
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
    out = {"device": torch.cuda.get_device_name() if is_cuda else "cpu", "torch": torch.__version__,
           "cache": generate_kwargs(policy).get("cache_implementation", "dynamic") if args.cache == "engine" else "dynamic",
           "hidden_size": args.hidden, "layers": args.layers, "batch": args.batch, "generations": args.generations,
           "max_new_tokens": args.max_new, "rollout_tokens_per_s": round(gen_tokens / gen_time, 1),
           "optimisation_steps_per_s": round(args.steps / train_time, 3),
           "grpo_steps_per_s": round(args.steps / (gen_time + train_time), 3)}
    if is_cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
