"""Pretraining throughput of the engine's model and loop pieces, as JSON.

    python bench/train_throughput.py --hidden 768 --layers 8 --batch 32 --seq 340 --steps 20 [--device cuda]

Measures forward+backward+AdamW on random token rows (the data pipeline is not the bottleneck) after warm-up steps:
tokens/s, step time, peak memory and model FLOPs utilisation when the GPU's peak is known.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from training.model import build_model  # noqa: E402
from training.spec import model_config, parameter_count, resolve_config  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "4090": 165.0, "3090": 71.0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=340)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()

    cfg = resolve_config("pretrain", {"hidden_size": args.hidden, "num_hidden_layers": args.layers})
    mcfg = model_config(cfg)
    torch.manual_seed(0)
    model = build_model(mcfg).to(args.device)
    if args.compile:
        model = torch.compile(model)
    is_cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=is_cuda)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    x = torch.randint(3, mcfg["vocab_size"], (args.batch, args.seq), device=args.device)

    def step():
        with torch.autocast("cuda", dtype=amp, enabled=is_cuda and amp is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if is_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    params = parameter_count(mcfg)
    # 6·N per token for the matmuls plus attention's 12·L·H·T (PaLM's accounting), non-embedding N.
    n = params["active"] - mcfg["vocab_size"] * mcfg["hidden_size"]
    flops_per_token = 6 * n + 6 * mcfg["vocab_size"] * mcfg["hidden_size"] + 12 * mcfg["num_hidden_layers"] * \
        mcfg["hidden_size"] * args.seq
    out = {"device": torch.cuda.get_device_name() if is_cuda else "cpu", "torch": torch.__version__,
           "hidden_size": args.hidden, "layers": args.layers, "batch": args.batch, "seq": args.seq,
           "dtype": args.dtype if is_cuda else "float32", "compiled": args.compile, "params": params["total"],
           "step_time_s": round(dt, 5), "tokens_per_s": round(tokens / dt, 1),
           "achieved_tflops": round(flops_per_token * tokens / dt / 1e12, 3)}
    if is_cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in out["device"]), None)
        if peak:
            out["mfu"] = round(out["achieved_tflops"] / peak, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
