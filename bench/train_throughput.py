"""Training throughput of MiniCloud's engine (and optionally MiniMind's own model class), as JSON lines.

    python bench/train_throughput.py                      # MiniMind-3 shapes on the available device
    python bench/train_throughput.py --cases dense,moe,sft --compile both --minimind ~/minimind
    python bench/train_throughput.py --hidden 64 --layers 2 --batch 8 --seq 64 --steps 3   # CPU smoke run

Cases (MiniMind's defaults): ``dense`` pretraining (hidden 768, 8 layers, batch 32 × 340, accumulation 8),
``moe`` the same with 4 experts top-1, ``sft`` batch 16 × 768 with conversation-like lengths (uniform between a
quarter of the row and the full row; pad counted apart), ``sft_grouped`` the same with ``group_by_length``,
``sft_packed`` the same packed (the engine's default for SFT, LoRA, DPO and distillation: training/rows.py),
``sft_packed_flex`` packed with FlexAttention's block mask instead of the dense mask (``packed_attention: flex``;
CUDA only: FlexAttention has no backward on the CPU),
``distill`` / ``distill_packed`` rows of that kind at MiniMind's train_distillation.py defaults (batch 32 × 340) with
a frozen teacher (``--teacher-hidden``/``--teacher-layers``/``--teacher-dense``; MiniMind's default, 768 × 8 MoE) and
the distillation loss (training/distill.py: CE and T²·KL at alpha 0.5, T 1.5). For SFT
our engine's batching is measured as it trains: random batches (or grouped by length), each trimmed of its right
padding; MiniMind's class gets MiniMind's full padded rows in random order. Each measures forward + backward + clip + fused AdamW after warm-up
steps on random tokens, and prints tokens/s (all and non-pad), step time, peak memory and model FLOPs utilisation
(when the GPU's bf16 peak is known).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from training.distill import make_loss as distill_loss  # noqa: E402
from training.loop import compile_for_training, row_lengths, trim_padding  # noqa: E402
from training.rows import epoch_order, pack_rows  # noqa: E402
from training.model import ATTENTION, GPU_EXPERTS, aux_loss, block_mask, build_model, packed_inputs  # noqa: E402
from training.spec import model_config, parameter_count, resolve_config  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "3090": 71.0}
CASES = {"dense": {"use_moe": False, "batch": 32, "seq": 340, "accum": 8, "padded": False},
         "moe": {"use_moe": True, "batch": 32, "seq": 340, "accum": 8, "padded": False},
         "sft": {"use_moe": False, "batch": 16, "seq": 768, "accum": 1, "padded": True},
         "sft_grouped": {"use_moe": False, "batch": 16, "seq": 768, "accum": 1, "padded": True, "grouped": True},
         "sft_packed": {"use_moe": False, "batch": 16, "seq": 768, "accum": 1, "padded": True, "packed": True},
         "sft_packed_flex": {"use_moe": False, "batch": 16, "seq": 768, "accum": 1, "padded": True, "packed": True,
                             "flex": True},
         "distill": {"use_moe": False, "batch": 32, "seq": 340, "accum": 1, "padded": True, "teacher": True},
         "distill_packed": {"use_moe": False, "batch": 32, "seq": 340, "accum": 1, "padded": True, "packed": True,
                            "teacher": True}}


def minimind_model(path, mcfg):
    sys.path.insert(0, os.path.expanduser(path))
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    return MiniMindForCausalLM(MiniMindConfig(hidden_size=mcfg["hidden_size"], num_hidden_layers=mcfg["num_hidden_layers"],
                                              use_moe=mcfg["use_moe"]))


def sdpa_backends(name):
    """A context that puts one SDPA backend first (``default``: PyTorch's own order)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(name)
    if first is None:
        return nullcontext()
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


def make_batches(case, batch, seq, vocab, ours, multiple, n_batches=64):
    """Random-token micro-batches ``(x, y, packed)``. Padded cases: rows of conversation-like lengths, right-padded
    (id 0, label -100); for ``ours`` ordered (``group_by_length`` when the case says so) and trimmed as the engine's
    loop does, or packed (each batch's conversations in as few rows as fit, attending only to their own:
    training.rows.pack_rows, the engine's ``packing``), otherwise full width in random order (MiniMind, which neither
    trims nor packs)."""
    gen = torch.Generator().manual_seed(0)
    if not case["padded"]:
        return [(x, x.clone(), None) for x in torch.randint(3, vocab, (n_batches, batch, seq), generator=gen)]
    rows = batch * n_batches
    x = torch.randint(3, vocab, (rows, seq), generator=gen)
    lengths = torch.randint(seq // 4, seq + 1, (rows,), generator=gen)
    pad = torch.arange(seq)[None, :] >= lengths[:, None]
    x[pad] = 0
    y = x.masked_fill(pad, -100)
    data = {"x": x, "y": y}
    order = epoch_order(rows, batch, 0, 0, row_lengths(data) if ours and case.get("grouped") else None)
    out = []
    for i in range(n_batches):
        rows = order[i * batch:(i + 1) * batch]
        if ours and case.get("packed"):
            b = pack_rows([(x[r, :lengths[r]].numpy(), y[r, :lengths[r]].numpy()) for r in rows], seq, multiple)
            out.append((b["x"], b["y"], {"pos": b["pos"], "doc": b["doc"]}))
            continue
        b = {k: v[rows] for k, v in data.items()}
        if ours:
            b = trim_padding(b, multiple)
        out.append((b["x"], b["y"], None))
    return out


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
        model = build_model(mcfg, GPU_EXPERTS if is_cuda and case["use_moe"] else None, fused=not args.unfused,
                            attention=args.attn).to(device)
    model.train()
    distill = None
    if case.get("teacher"):  # a frozen teacher of its own size (ours or MiniMind's class, as the student)
        tcfg = model_config(resolve_config("pretrain", {"hidden_size": args.teacher_hidden,
                                                        "num_hidden_layers": args.teacher_layers,
                                                        "use_moe": not args.teacher_dense}))
        teacher = (minimind_model(args.minimind, tcfg) if impl == "minimind" else
                   build_model(tcfg, GPU_EXPERTS if is_cuda and tcfg["use_moe"] else None)).to(device)
        distill = distill_loss(teacher, alpha=0.5, temperature=1.5)
    graphs = compiled and args.compile_mode != "default"
    step_model = compile_for_training(model, args.compile_mode, args.coordinate_descent) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=is_cuda)
    batch, seq = args.batch or case["batch"], args.seq or case["seq"]
    accum = args.accum or case["accum"]
    batches = make_batches(case, batch, seq, mcfg["vocab_size"], ours=impl == "ours", multiple=64 if compiled else 8)
    batches = [(x.to(device), y.to(device), {k: v.to(device) for k, v in packed.items()} if packed else {})
               for x, y, packed in batches]
    feed = iter(range(10**9))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)

    def optimizer_step():
        for _ in range(accum):
            x, y, extra = batches[next(feed) % len(batches)]
            if case.get("flex") and impl == "ours":  # made per batch on the device, as the engine's loop does
                extra = {**extra, "block_mask": block_mask(extra["doc"])}
            with amp:
                if distill is not None:  # the engine's loss: its model call passes the packed rows' mask
                    loss, _ = distill(step_model, {"x": x, "y": y, **extra})
                else:
                    out = step_model(input_ids=x, labels=y, **packed_inputs(extra))
                    loss = out.loss
                    aux = aux_loss(model) if impl == "ours" else getattr(out, "aux_loss", None)
                    if aux is not None:
                        loss = loss + aux
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=not graphs)

    warmup = args.warmup
    if case["padded"]:  # every trimmed width once, so that compilation stays out of the timing
        warmup = max(warmup, -(-len(batches) // accum))
    for _ in range(warmup):
        optimizer_step()
    if args.profile and is_cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile):
                optimizer_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
              file=sys.stderr, flush=True)
    if is_cuda:
        torch.cuda.synchronize()
        # CUDA graphs keep their intermediates in a pool recorded during the warm-up; what the process holds at the
        # busiest moment (pool included) is max_memory_reserved over the whole run, so keep that before the reset
        whole_run_reserved = torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
    steps = max(args.steps, len(batches) // accum) if case["padded"] else args.steps  # padded: every batch once
    feed = iter(range(10**9))  # the timed steps see the same batches whatever the warm-up took
    t0 = time.perf_counter()
    for _ in range(steps):
        optimizer_step()
    if is_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    timed = [batches[i % len(batches)] for i in range(steps * accum)]
    tokens = sum(x.numel() for x, _, _ in timed) / steps  # per optimizer step, as computed (after trimming)
    real = sum(int((y != -100).sum()) for _, y, _ in timed) / steps
    rows = sum(x.shape[0] for x, _, _ in timed) / steps
    params = parameter_count(mcfg)
    h, layers, v = mcfg["hidden_size"], mcfg["num_hidden_layers"], mcfg["vocab_size"]
    dense_active = params["active"] - v * h  # non-embedding active parameters
    width = tokens / rows  # mean computed row width
    flops_per_token = 6 * (dense_active + v * h) + 12 * layers * h * width  # matmuls (incl. the head) + attention
    out = {"case": name, "impl": impl, "compiled": compiled, "fused": impl == "ours" and not args.unfused,
           "attn": args.attn if impl == "ours" else "minimind", "compile_mode": args.compile_mode,
           "coordinate_descent": args.coordinate_descent, "sdpa_backend": args.sdpa_backend, "device": torch.cuda.get_device_name() if is_cuda else "cpu",
           "torch": torch.__version__, "hidden_size": h, "layers": layers, "use_moe": case["use_moe"], "batch": batch,
           "seq": seq, "accumulation": accum, "params": params["total"], "active_params": params["active"],
           "teacher": [args.teacher_hidden, args.teacher_layers, "dense" if args.teacher_dense else "moe"]
           if distill else None,
           "step_time_s": round(dt, 4), "tokens_per_s": round(tokens / dt, 1),
           "nonpad_tokens_per_s": round(real / dt, 1), "mean_width": round(width, 1), "rows_per_step": rows,
           "achieved_tflops": round(flops_per_token * real / dt / 1e12, 2)}  # useful (non-pad) work only
    if distill is not None:  # the teacher's forward is not in the student's FLOPs: no utilisation figure
        del out["achieved_tflops"]
    if is_cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # the timed steps' own
        out["peak_reserved_gb"] = round(max(whole_run_reserved, torch.cuda.max_memory_reserved()) / 2**30, 2)
        peak = next((t for k, t in PEAK_BF16_TFLOPS.items() if k in out["device"]), None)
        if peak and "achieved_tflops" in out:
            out["mfu"] = round(out["achieved_tflops"] / peak, 4)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="dense,moe,sft")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    p.add_argument("--minimind", help="a MiniMind checkout: also measure its own model class on the same shapes")
    p.add_argument("--impls", default="ours,minimind", help="which of ours,minimind to measure (minimind needs --minimind)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, help="override the case's batch")
    p.add_argument("--seq", type=int, help="override the case's sequence length")
    p.add_argument("--accum", type=int, help="override the case's accumulation steps")
    p.add_argument("--teacher-hidden", type=int, default=768, help="distill cases: the teacher's hidden size")
    p.add_argument("--teacher-layers", type=int, default=8, help="distill cases: the teacher's layers")
    p.add_argument("--teacher-dense", action="store_true", help="distill cases: a dense teacher (default: MoE)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--unfused", action="store_true", help="ours: transformers' separate q/k/v and gate/up matmuls")
    p.add_argument("--attn", default=ATTENTION, choices=["sdpa", "sdpa_repeat_kv"],
                   help="ours: attention function (sdpa: transformers' own, with enable_gqa)")
    p.add_argument("--sdpa-backend", default="default", choices=["default", "cudnn", "flash", "efficient"])
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="the engine's compile_mode (reduce-overhead: CUDA graphs of each micro-step; max-autotune: "
                        "the same with autotuned kernels, not an engine mode yet)")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="the engine's compile_tuning: inductor's coordinate-descent tuning of its generated kernels' "
                        "block sizes (longer compile)")
    p.add_argument("--profile", type=int, default=0, help="CUDA: print the top kernels of N profiled steps to stderr")
    args = p.parse_args()
    impls = [i for i in args.impls.split(",") if i == "ours" or (i == "minimind" and args.minimind)]
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for name in args.cases.split(","):
        if CASES[name].get("flex") and not args.device.startswith("cuda"):
            print(json.dumps({"case": name, "skipped": "FlexAttention has no backward on the CPU"}), flush=True)
            continue
        for impl in impls:
            for compiled in compiles:
                with sdpa_backends(args.sdpa_backend):
                    print(json.dumps(measure(name, CASES[name], args, impl, compiled)), flush=True)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
