"""Training throughput of MiniCloud's engine (and optionally MiniMind's own model class), as JSON lines.

    python bench/train_throughput.py                      # MiniMind-3 shapes on the available device
    python bench/train_throughput.py --cases dense,moe,sft --compile both --minimind ~/minimind
    python bench/train_throughput.py --hidden 64 --layers 2 --batch 8 --seq 64 --steps 3   # CPU smoke run

Cases (MiniMind's defaults): ``dense`` pretraining (hidden 768, 8 layers, batch 32 × 340, accumulation 8),
``moe`` the same with 4 experts top-1, ``sft`` batch 16 × 768 with conversation-like lengths (pad counted apart).
Each measures forward + backward + clip + fused AdamW after warm-up steps on random tokens, and prints tokens/s (all
and non-pad), step time, peak memory and model FLOPs utilisation (when the GPU's bf16 peak is known).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from training.model import aux_loss, build_model  # noqa: E402
from training.spec import model_config, parameter_count, resolve_config  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "3090": 71.0}
CASES = {"dense": {"use_moe": False, "batch": 32, "seq": 340, "accum": 8, "padded": False},
         "moe": {"use_moe": True, "batch": 32, "seq": 340, "accum": 8, "padded": False},
         "sft": {"use_moe": False, "batch": 16, "seq": 768, "accum": 1, "padded": True}}


def minimind_model(path, mcfg):
    sys.path.insert(0, os.path.expanduser(path))
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    return MiniMindForCausalLM(MiniMindConfig(hidden_size=mcfg["hidden_size"], num_hidden_layers=mcfg["num_hidden_layers"],
                                              use_moe=mcfg["use_moe"]))


def measure(name, case, args, impl, compiled):
    device = args.device
    is_cuda = device.startswith("cuda")
    cfg = resolve_config("pretrain", {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                                      "use_moe": case["use_moe"]})
    mcfg = model_config(cfg)
    torch.manual_seed(0)
    if impl == "minimind":
        model = minimind_model(args.minimind, mcfg).to(device)
    else:
        model = build_model(mcfg, "grouped_mm" if is_cuda and case["use_moe"] else None).to(device)
    model.train()
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=is_cuda)
    batch, seq = args.batch or case["batch"], args.seq or case["seq"]
    accum = args.accum or case["accum"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, mcfg["vocab_size"], (batch, seq), generator=gen)
    y = x.clone()
    if case["padded"]:  # conversation-like lengths: uniform between a quarter and the full row
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen)
        pad = torch.arange(seq)[None, :] >= lengths[:, None]
        x[pad], y[pad] = 0, -100
    x, y = x.to(device), y.to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)

    def optimizer_step():
        for _ in range(accum):
            with amp:
                out = step_model(input_ids=x, labels=y)
                loss = out.loss
                aux = aux_loss(model) if impl == "ours" else getattr(out, "aux_loss", None)
                if aux is not None:
                    loss = loss + aux
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        optimizer_step()
    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step()
    if is_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens, real = batch * seq * accum, int((y != -100).sum()) * accum
    params = parameter_count(mcfg)
    h, layers, v = mcfg["hidden_size"], mcfg["num_hidden_layers"], mcfg["vocab_size"]
    dense_active = params["active"] - v * h  # non-embedding active parameters
    flops_per_token = 6 * (dense_active + v * h) + 12 * layers * h * seq  # matmuls (incl. the head) + attention
    out = {"case": name, "impl": impl, "compiled": compiled, "device": torch.cuda.get_device_name() if is_cuda else "cpu",
           "torch": torch.__version__, "hidden_size": h, "layers": layers, "use_moe": case["use_moe"], "batch": batch,
           "seq": seq, "accumulation": accum, "params": params["total"], "active_params": params["active"],
           "step_time_s": round(dt, 4), "tokens_per_s": round(tokens / dt, 1),
           "nonpad_tokens_per_s": round(real / dt, 1), "achieved_tflops": round(flops_per_token * tokens / dt / 1e12, 2)}
    if is_cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = next((t for k, t in PEAK_BF16_TFLOPS.items() if k in out["device"]), None)
        if peak:
            out["mfu"] = round(out["achieved_tflops"] / peak, 4)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="dense,moe,sft")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    p.add_argument("--minimind", help="a MiniMind checkout: also measure its own model class on the same shapes")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, help="override the case's batch")
    p.add_argument("--seq", type=int, help="override the case's sequence length")
    p.add_argument("--accum", type=int, help="override the case's accumulation steps")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    impls = ["ours"] + (["minimind"] if args.minimind else [])
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for name in args.cases.split(","):
        for impl in impls:
            for compiled in compiles:
                print(json.dumps(measure(name, CASES[name], args, impl, compiled)), flush=True)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
