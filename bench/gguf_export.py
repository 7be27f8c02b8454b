"""GGUF at MiniMind-3's own shapes: conversion time, file size and llama.cpp's CPU decode speed per type, beside
transformers' CPU generation of the same model (what the portal's chat worker runs), in one run.

    python bench/gguf_export.py [--moe] [--tokens 64] [--threads 2]

A random MiniMind-3 model (hidden 768, 8 layers, 8 heads / 4 KV heads, vocab 6400; ``--moe``: 4 experts, top-1)
and the demo tokenizer; every type through ``training.gguf_export.export_gguf`` (the f16 file verified in
llama.cpp), then greedy decoding of ``--tokens`` tokens after a 24-token prompt in llama.cpp per file and in
transformers (fp32, KV cache). Random weights: the perplexities are not meaningful here (the tests measure them on a
trained model); sizes and speeds are. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import llama_cpp
    import torch
    import transformers

    from training.__main__ import main as engine
    from training.convert import verify_prompt
    from training.gguf_export import TYPES, export_gguf, load_llama, llama_greedy
    from training.model import build_model, load_model, save_pth
    from training.spec import model_config, parameter_count, resolve_config

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    with contextlib.redirect_stdout(io.StringIO()):  # its own report: this script prints one JSON object
        engine(["demo-data", str(work / "demo")])
    cfg = {"use_moe": args.moe, **({"num_experts": 4, "num_experts_per_tok": 1} if args.moe else {})}
    mcfg = model_config(resolve_config("pretrain", cfg))
    torch.manual_seed(0)
    save_pth(build_model(mcfg), work / "m.pth")
    t0 = time.perf_counter()
    report = export_gguf(work / "m.pth", cfg, work / "gguf", work / "demo" / "demo-tokenizer", types=TYPES,
                         eval_data=work / "demo" / "demo-pretrain.jsonl")
    convert_s = time.perf_counter() - t0
    prompt = verify_prompt(mcfg["vocab_size"])[0].tolist()
    files = {}
    for t, info in report["files"].items():
        llm = load_llama(info["path"], n_ctx=len(prompt) + args.tokens + 8)
        llm.n_threads = args.threads
        llama_greedy(llm, prompt, 4)  # warm-up
        t1 = time.perf_counter()
        llama_greedy(llm, prompt, args.tokens)
        files[t] = {"bytes": info["bytes"], "decode_tokens_per_s": round(args.tokens / (time.perf_counter() - t1), 1),
                    "eval_perplexity_random_weights": round(info["perplexity"], 2),
                    "fallback_tensors": info.get("fallback_tensors")}
        del llm
    model, _ = load_model({"path": str(work / "m.pth"), "config": cfg})
    model = model.float().eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    hf_tps = args.tokens / (time.perf_counter() - t1)
    params = parameter_count(mcfg)
    print(json.dumps({
        "bench": "gguf_export", "moe": args.moe, "params": params["total"], "active_params": params["active"],
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llama_cpp_python": llama_cpp.__version__},
        "convert_all_types_s": round(convert_s, 1), "verification": report["verification"], "files": files,
        "reference_transformers_fp32_decode_tokens_per_s": round(hf_tps, 1),
    }))


if __name__ == "__main__":
    main()
