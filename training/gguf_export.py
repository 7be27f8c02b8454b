"""MiniMind ``.pth`` → GGUF for llama.cpp, Ollama and LM Studio, verified by running it in llama.cpp.

The file is written with the ``gguf`` package (the writer of llama.cpp's own ``convert_hf_to_gguf.py``) in the
``qwen3`` / ``qwen3moe`` architectures llama.cpp implements (our models are Qwen3 ones: q/k norms, tied embeddings,
SwiGLU, MoE with softmax top-k routing and renormalised weights). The tokenizer goes in as llama.cpp's ``gpt2`` BPE
(byte-level, GPT-2 pre-tokenizer regex: what ``training.tokenizer`` trains and MiniMind ships), with its merges,
special ids (bos 1, eos 2, pad 0), token types (ids < 21 control, the other reserved ones user-defined) and the chat
template. Types: ``f16`` and ``bf16`` (exact copies of the fp16 weights / bf16-rounded), ``q8_0`` quantised here
with ``gguf.quants`` (rows not a multiple of 32 stay f16, as in llama.cpp's converter), ``q4_k_m`` made from the f16
file by llama.cpp's own quantiser (``llama_model_quantize``; rows not a multiple of 256 fall back to the types
llama.cpp chooses).

Verification, like every other conversion: llama.cpp (``llama-cpp-python``) loads the f16 file, its logits on the
fixed prompt must match ours within ``GGUF_TOLERANCE`` and greedy decoding must give the same tokens; its tokenizer
must split a fixed text like ours. A quantised file is lossy by design: its figure is the perplexity on the eval
split of the model's dataset beside the f16 file's. ``support`` (torch-free: the portal calls it) says which types a
model's shapes allow and what falls back, before anything is converted.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .spec import Explained, gettext_noop

TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
# |Δlogit| allowed between llama.cpp on the f16 file and our fp32 forward of the same fp16 weights: ggml rounds the
# activations to f16 before each f16 matmul (its vec_dot type), worth a few 1e-3 on logits of magnitude ~10.
GGUF_TOLERANCE = 5e-2
GREEDY_TOKENS = 16
TOKENIZER_SAMPLE = "Hello, world! 你好，世界。 It's 2026: 3.14 <|im_start|>user\nhi<|im_end|>\n  two  spaces"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def support(config: dict, has_tokenizer: bool) -> dict:
    """``{type: {"available": bool, "note": str, "template": str, "params": dict}}`` for a model's MiniMind config:
    what llama.cpp cannot take (no tokenizer, odd head sizes) and which tensors fall back to another type. ``note`` is
    English; the portal translates ``template % params``. Plain Python, no torch."""
    h, heads = int(config.get("hidden_size", 0)), int(config.get("num_attention_heads", 1) or 1)
    inter = int((config.get("moe_intermediate_size") if config.get("use_moe") else None)
                or config.get("intermediate_size") or math.ceil(h * math.pi / 64) * 64)
    head_dim = h // heads if heads else 0
    blocker = None
    if not has_tokenizer:
        blocker = (gettext_noop("GGUF needs the model's tokenizer inside the file; this model has none attached"), {})
    elif head_dim % 2:
        blocker = (gettext_noop("llama.cpp's rotary embedding needs an even head size; this model's is %(head_dim)s"),
                   {"head_dim": head_dim})
    rows = {"hidden_size": h, "intermediate_size": inter}
    out = {}
    for t in TYPES:
        note = blocker or ("", {})
        block = {"q8_0": 32, "q4_k_m": 256}.get(t)
        odd = ", ".join(f"{k} {v}" for k, v in rows.items() if block and v % block)
        if not blocker and odd:
            note = (gettext_noop("rows of %(sizes)s are not a multiple of %(block)s: those tensors stay f16")
                    if t == "q8_0" else
                    gettext_noop("rows of %(sizes)s are not a multiple of %(block)s: llama.cpp stores those tensors "
                                 "in a fallback type (Q5_0/Q8_0), so the file is larger than Q4_K_M usually is"),
                    {"sizes": odd, "block": block})
        out[t] = {"available": blocker is None, "note": note[0] % note[1] if note[0] else "", "template": note[0],
                  "params": note[1]}
    return out


def modelfile(gguf_name: str) -> str:
    """An Ollama ``Modelfile`` for the GGUF file beside it: our chat format as Ollama's Go template, stop tokens and
    MiniMind's sampling defaults."""
    template = (
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        '{{- if eq .Role "assistant" }}\n<think>\n{{ .Thinking }}\n</think>\n\n{{ .Content }}'
        '{{- else }}\n{{ .Content }}{{- end }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n<think>\n\n</think>\n\n'
    )
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in STOP_TOKENS)
    return (f"FROM ./{gguf_name}\n\nTEMPLATE \"\"\"{template}\"\"\"\n\n{stops}"
            "PARAMETER temperature 0.85\nPARAMETER top_p 0.85\nPARAMETER top_k 50\n")


# --- writing -----------------------------------------------------------------------------------------------------

def _vocab(tokenizer_dir: Path, n_vocab: int):
    """(tokens, token types) of length ``n_vocab`` from tokenizer.json; ids the tokenizer lacks are unused pads."""
    import gguf

    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    types = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise ValueError(f"tokenizer has ids up to {max(by_id)}, the model only {n_vocab}")
    tokens, toktypes = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            toktypes.append(types.get(i, gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
    return tokens, toktypes


def _tensors(sd: dict, mcfg: dict):
    """(GGUF name, float32 array) in llama.cpp's layout: per-expert weights stacked into one 3-D tensor each, the
    tied output head left out (llama.cpp reuses token_embd)."""
    import gguf

    arch = gguf.MODEL_ARCH.QWEN3MOE if mcfg["use_moe"] else gguf.MODEL_ARCH.QWEN3
    names = gguf.get_tensor_name_map(arch, mcfg["num_hidden_layers"])
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            continue
        arr = value.float().numpy()
        parts = key.split(".")
        if ".mlp.experts." in key:  # model.layers.L.mlp.experts.E.gate_proj.weight
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = arr
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {key}")
        yield name, arr
    for (layer, proj), by_expert in sorted(experts.items()):
        key = f"model.layers.{layer}.mlp.experts.{proj}.weight"
        yield names.get_name(key, try_suffixes=(".weight",)), np.stack([by_expert[e] for e in sorted(by_expert)])


def write_gguf(sd: dict, mcfg: dict, tokenizer_dir: str | Path, out_path: str | Path, ftype: str = "f16",
               name: str = "minimind") -> dict:
    """Write one GGUF file (``f16``, ``bf16`` or ``q8_0``) of ``sd`` (the model's MiniMind state dict,
    ``training.model.minimind_state_dict``) with its resolved config ``mcfg``; the report says how many tensors fell
    back to f16."""
    import gguf
    from gguf.quants import quantize

    tokens, toktypes = _vocab(Path(tokenizer_dir), mcfg["vocab_size"])
    arch = gguf.MODEL_ARCH.QWEN3MOE if mcfg["use_moe"] else gguf.MODEL_ARCH.QWEN3
    qtype, file_type = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
                        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
                        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}[ftype]
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    h, heads = mcfg["hidden_size"], mcfg["num_attention_heads"]
    w.add_name(name)
    w.add_context_length(mcfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(mcfg["num_hidden_layers"])
    w.add_feed_forward_length(mcfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(mcfg["num_key_value_heads"])
    w.add_key_length(h // heads)
    w.add_value_length(h // heads)
    w.add_rope_freq_base(float(mcfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(mcfg["rms_norm_eps"]))
    w.add_file_type(file_type)
    if mcfg["use_moe"]:
        w.add_expert_count(mcfg["num_experts"])
        w.add_expert_used_count(mcfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(mcfg["moe_intermediate_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=mcfg["vocab_size"])
    special._set_special_token("bos", 1)
    special._set_special_token("eos", 2)
    special._set_special_token("pad", 0)
    special.add_to_gguf(w, quiet=True)
    fallback = 0
    for tname, arr in _tensors(sd, mcfg):
        if arr.ndim == 1:  # norms stay f32, as in llama.cpp's converter
            w.add_tensor(tname, arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16 or (qtype == gguf.GGMLQuantizationType.Q8_0
                                                        and arr.shape[-1] % 32):
            fallback += qtype != gguf.GGMLQuantizationType.F16
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            w.add_tensor(tname, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_path)
    return {"path": str(out_path), "type": ftype, "fallback_tensors": fallback}


def quantize_q4_k_m(f16_path: str | Path, out_path: str | Path) -> dict:
    """Q4_K_M by llama.cpp's own quantiser, from the f16 file."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = min(os.cpu_count() or 1, 8)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's quantiser failed (code {rc})")
    os.replace(tmp, out_path)
    return {"path": str(out_path), "type": "q4_k_m"}


# --- running it in llama.cpp --------------------------------------------------------------------------------------

def load_llama(path: str | Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=min(os.cpu_count() or 1, 8))


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def torch_greedy(model, prompt, n: int) -> list[int]:
    import torch

    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def verify_f16(model, gguf_path: str | Path, vocab_size: int, tokenizer_dir: str | Path) -> dict:
    """llama.cpp on the f16 file against our model: logits on the fixed prompt, greedy tokens, tokenizer split."""
    import torch

    from .convert import verify_prompt
    from .tokenizer import load_tokenizer

    prompt = verify_prompt(vocab_size)
    model = model.float().eval()
    with torch.no_grad():
        ours = model(input_ids=prompt).logits[0].numpy()
    llm = load_llama(gguf_path, n_ctx=prompt.shape[1] + GREEDY_TOKENS + 8)
    theirs = llama_logits(llm, prompt[0].tolist())
    diff = float(np.abs(ours - theirs).max())
    greedy_ours = torch_greedy(model, prompt, GREEDY_TOKENS)
    greedy_llama = llama_greedy(llm, prompt[0].tolist(), GREEDY_TOKENS)
    tok_ours = load_tokenizer(tokenizer_dir).encode(TOKENIZER_SAMPLE).ids
    tok_llama = llm.tokenize(TOKENIZER_SAMPLE.encode(), add_bos=False, special=True)
    ok = diff <= GGUF_TOLERANCE and greedy_ours == greedy_llama and tok_ours == tok_llama
    return {"max_abs_diff": diff, "tolerance": GGUF_TOLERANCE, "ok": bool(ok), "prompt_tokens": int(prompt.shape[1]),
            "max_abs_logit": float(np.abs(ours).max()), "greedy_tokens": GREEDY_TOKENS,
            "greedy_match": greedy_ours == greedy_llama, "tokenizer_match": tok_ours == tok_llama,
            "runtime": "llama.cpp " + _llama_version()}


def _llama_version() -> str:
    import llama_cpp

    return f"(llama-cpp-python {llama_cpp.__version__})"


def eval_rows(tokenizer_dir: str | Path, data: str | Path, eval_ratio: float = 0.05, seed: int = 42,
              max_seq_len: int = 512, limit: int = 16, records: int = 2000) -> list[tuple[list[int], list[int]]]:
    """The eval split the training stages hold out (``Rows.split`` of the dataset's first ``records`` records, with
    the job's ratio and seed): up to ``limit`` (input ids, labels) pairs, trimmed after their last label."""
    from .chat import load_hf_tokenizer
    from .records import iter_records, kind_of
    from .rows import from_records
    from .spec import resolve_config

    first = next(iter_records(data, None, 1))[1]
    kind = "pretrain" if kind_of(first) == "pretrain" else "sft"
    cfg = {**resolve_config(kind, {"max_seq_len": max_seq_len}),
           "packing": False, "system_prompt_ratio": 0.0, "empty_think_drop_ratio": 0.0}
    recs = [r for _, r in iter_records(data, kind, records)]
    rows = from_records(load_hf_tokenizer(str(tokenizer_dir)), kind, recs, cfg)
    held = rows.split(eval_ratio, seed)[1] or rows
    batch = held.batch(np.arange(min(limit, len(held))))
    out = []
    for x, y in zip(batch["x"].tolist(), batch["y"].tolist()):
        last = max((i for i, v in enumerate(y) if v != -100), default=0)
        if last > 0:
            out.append((x[:last + 1], y[:last + 1]))
    return out


def llama_perplexity(path: str | Path, rows, n_ctx: int) -> dict:
    """exp(mean NLL) of llama.cpp on the file over the labelled tokens of ``rows``."""
    llm = load_llama(path, n_ctx)
    total, count = 0.0, 0
    for x, y in rows:
        logits = llama_logits(llm, x)[:-1].astype(np.float64)
        labels = np.array(y[1:])
        keep = labels != -100
        if not keep.any():
            continue
        logits = logits[keep]
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((lse - logits[np.arange(len(logits)), labels[keep]]).sum())
        count += int(keep.sum())
    return {"perplexity": math.exp(min(total / max(count, 1), 50.0)), "tokens": count}


def export_gguf(pth: str | Path, config: dict, out_dir: str | Path, tokenizer_dir: str | Path,
                types=("f16",), eval_data: str | Path | None = None, eval_ratio: float = 0.05, seed: int = 42,
                name: str = "minimind") -> dict:
    """The f16 file (always: it is verified and every other type is measured beside it) and each of ``types``, with
    an Ollama Modelfile per file; the report holds the f16 verification and every file's eval perplexity."""
    from .model import load_model, minimind_state_dict

    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise ValueError(f"GGUF type {unknown[0]!r} is not one of {', '.join(TYPES)}")
    model, mcfg = load_model({"path": str(pth), "config": config})
    blocked = support(mcfg, bool(tokenizer_dir))["f16"]
    if not blocked["available"]:
        raise Explained(blocked["template"], **blocked["params"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    f16 = out_dir / f"{name}-f16.gguf"
    sd = minimind_state_dict(model)  # read once: every type is written from it
    files["f16"] = write_gguf(sd, mcfg, tokenizer_dir, f16, "f16", name)
    verification = verify_f16(model, f16, mcfg["vocab_size"], tokenizer_dir)
    for t in types:
        if t == "f16":
            continue
        path = out_dir / f"{name}-{t}.gguf"
        files[t] = (quantize_q4_k_m(f16, path) if t == "q4_k_m" else
                    write_gguf(sd, mcfg, tokenizer_dir, path, t, name))
    for t, info in files.items():
        Path(info["path"]).with_suffix(".Modelfile").write_text(modelfile(Path(info["path"]).name), encoding="utf-8")
        info["bytes"] = Path(info["path"]).stat().st_size
    if eval_data:
        rows = eval_rows(tokenizer_dir, eval_data, eval_ratio, seed, min(mcfg["max_position_embeddings"], 512))
        n_ctx = max((len(x) for x, _ in rows), default=8) + 8
        for info in files.values():
            info.update(llama_perplexity(info["path"], rows, n_ctx))
    return {"out": str(out_dir), "config": mcfg, "files": files, "verification": verification}
