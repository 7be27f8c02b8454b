"""``python -m training run SPEC.json`` | ``demo-data OUT_DIR`` | ``train-tokenizer DATA.jsonl... --out DIR`` |
``convert hf|pth|gguf SRC OUT`` | ``inspect PTH --config C`` | ``merge-lora BASE LORA OUT --config C`` | ``chat-worker`` |
``prepare DATASET ...`` (build a token cache) |
``warm FD`` (the fork server of training.warm)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial
from pathlib import Path


def cmd_run(args) -> int:
    from . import events
    from .spec import Explained, SpecError, explanation, gettext_noop, load_spec, model_config, parameter_count

    if nice := int(os.environ.get("MINICLOUD_NICE") or 0):  # a job on CPU slots: jobs/supervisor.py
        os.nice(nice)

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        if events.is_rank0():  # every rank reads the same spec: one report is enough
            template, params = exc.explained()
            events.emit("error", kind="spec", field=exc.field, message=str(exc), template=template, params=params)
        return 2
    phase = "model"  # where an out-of-memory error happened: building the model(s), or training
    try:
        import torch

        from . import threads_given

        if threads := threads_given():
            # a job on CPU slots gets its share of the cores (jobs/supervisor.py); a run forked from the warm engine
            # (training/warm.py) has the threads its server started with: say it again
            torch.set_num_threads(threads)
        from . import distill, dpo, evaluate, grpo, lora, ppo, pretrain, sft
        from .chat import load_hf_tokenizer
        from .model import GPU_EXPERTS, build_model, load_model

        cfg = spec["config"]
        torch.manual_seed(cfg["seed"])
        experts = GPU_EXPERTS if torch.cuda.is_available() and spec["device"] != "cpu" else None
        if spec.get("base_model"):
            model, mcfg = load_model(spec["base_model"], experts)
            cfg.update(mcfg)
        else:
            mcfg = model_config(cfg)
            model = build_model(mcfg, experts)
        tok = load_hf_tokenizer(spec["tokenizer"])
        if len(tok) > mcfg["vocab_size"]:
            raise Explained(gettext_noop("vocab_size: the tokenizer has %(tokens)s tokens, the model only "
                                         "%(vocab)s"), tokens=len(tok), vocab=mcfg["vocab_size"])
        run_dir = Path(spec["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model_config.json").write_text(json.dumps(mcfg, indent=2))
        params = parameter_count(mcfg)
        moe = f"-A{params['active'] / 1e6:.2f}M" if mcfg["use_moe"] else ""
        events.log(f"Model Params: {params['total'] / 1e6:.2f}M{moe}")
        stage = spec["stage"]
        if stage == "distill":
            teacher, _ = load_model(spec["teacher_model"], experts)
            runner = partial(distill.run, teacher=teacher)
        else:
            runner = {"pretrain": pretrain.run, "sft": sft.run, "lora": lora.run, "dpo": dpo.run, "ppo": ppo.run,
                      "grpo": grpo.run, "eval": evaluate.run}[stage]
        phase = "training"
        result = runner(spec, model, tok)
        steps = result.pop("steps")
        events.emit("done", step=steps, model_config=mcfg, params=params["total"], **result)
        return 0
    except SystemExit:
        raise
    except Exception as exc:  # one line for the user, the traceback for the log
        sys.stderr.write(traceback.format_exc())
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if out_of_memory(exc):  # explained, in the reader's language (the portal translates the template)
            template = (gettext_noop("out of memory: %(error)s — try a smaller batch_size or max_seq_len (a larger "
                                     "accumulation_steps keeps the same effective batch)") if phase == "training" else
                        gettext_noop("out of memory: %(error)s — the model itself does not fit: choose a smaller "
                                     "model"))
            events.emit("error", kind="out_of_memory", message=template % {"error": message}, template=template,
                        params={"error": message})
        elif explained := explanation(exc):  # spec.Explained (loop.Diverged too), a SpecError: in the reader's language
            events.emit("error", kind=type(exc).__name__.lower(), message=message, template=explained[0],
                        params=explained[1])
        else:
            events.emit("error", kind=type(exc).__name__, message=message)
        return 1


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocation the CPU could not make (torch raises a RuntimeError there)."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def cmd_demo_data(args) -> int:
    from .demo_data import iter_texts, write_demo_datasets
    from .tokenizer import train_tokenizer

    paths = write_demo_datasets(args.out)
    texts = [t for p in paths.values() for t in iter_texts(p)]
    train_tokenizer(texts, Path(args.out) / "demo-tokenizer")
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_train_tokenizer(args) -> int:
    from .demo_data import iter_texts
    from .tokenizer import train_tokenizer

    texts = [t for p in args.data for t in iter_texts(p)]
    train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    return 0


def _report(fn) -> int:
    """Run a conversion; print its JSON report, or ``{"error": ...}`` (one line naming the problem; with ``template``
    and ``params`` where the engine explains it, for the portal to translate) and exit 2."""
    from .spec import error_report

    try:
        print(json.dumps(fn()))
        return 0
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        sys.stderr.write(traceback.format_exc())
        print(json.dumps(error_report(exc), ensure_ascii=False, default=str))
        return 2


def _config_arg(args) -> dict:
    return json.loads(Path(args.config).read_text()) if args.config else {}


def cmd_convert(args) -> int:
    from . import convert

    if args.to == "hf":
        return _report(lambda: convert.export_hf(args.src, _config_arg(args), args.out, args.tokenizer,
                                                 layout=args.layout))
    if args.to == "gguf":
        from .gguf_export import export_gguf

        return _report(lambda: export_gguf(args.src, _config_arg(args), args.out, args.tokenizer,
                                           types=args.types.split(","), eval_data=args.eval_data,
                                           eval_ratio=args.eval_ratio, seed=args.seed, name=args.name))
    return _report(lambda: convert.import_hf(args.src, args.out))


def cmd_inspect(args) -> int:
    from . import convert

    return _report(lambda: convert.inspect_pth(args.src, _config_arg(args)))


def cmd_merge_lora(args) -> int:
    from . import convert

    return _report(lambda: convert.merge_lora(args.base, _config_arg(args), args.lora, args.out))


def cmd_chat_worker(args) -> int:
    from .chat_worker import main as worker

    return worker(args.listen, args.slots, args.per_user, args.models_gb)


def cmd_prepare(args) -> int:
    """Build a dataset's token cache (the background builder of a job that started without waiting for it, or of a
    dataset's statistics). Its events go to its reader's stdout (the job's own); a failure is a warning there (the job
    reads the same records itself and reports a bad one when it reaches it). SIGTERM stops it, leaving nothing."""
    import signal

    from . import events, token_cache
    from .chat import load_hf_tokenizer

    def stop(signum, frame):  # asked to stop (statistics a later request superseded): the build removes its part
        raise SystemExit(128 + signum)

    # its own handler: a disposition inherited from the process that started it (a django-q2 worker ignores SIGINT)
    # must not leave it deaf
    signal.signal(signal.SIGTERM, stop)
    try:
        token_cache.prepare(args.dataset, load_hf_tokenizer(args.tokenizer), args.tokenizer, args.processing,
                            json.loads(args.options), Path(args.cache), data_sha=args.sha256 or None,
                            cap_bytes=int(float(args.cap_gb) * 1e9) if args.cap_gb else None)
    except Exception as exc:  # noqa: BLE001 -- reported, the job goes on
        events.log(f"data: the background tokenisation stopped: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                   level="warning")
        return 1
    return 0


def cmd_warm(args) -> int:
    from .warm import serve

    return serve(args.fd)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run a job spec, writing JSON-lines events to stdout")
    p.add_argument("spec")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo-data", help="write the demo datasets and train the demo tokenizer")
    p.add_argument("out")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with MiniMind's reserved ids")
    p.add_argument("data", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=6400)
    p.set_defaults(func=cmd_train_tokenizer)
    p = sub.add_parser("convert", help="MiniMind .pth <-> Hugging Face folder, .pth -> GGUF, verified by logits "
                                       "(JSON report)")
    p.add_argument("to", choices=["hf", "pth", "gguf"],
                   help="hf: .pth → folder; pth: folder → .pth; gguf: .pth → folder of GGUF files + Modelfiles")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--config", help="JSON file of MiniMind config names (for a .pth)")
    p.add_argument("--tokenizer", help="tokenizer folder to copy into the Hugging Face folder (GGUF: required)")
    p.add_argument("--layout", choices=["transformers5", "transformers4"], default="transformers5",
                   help="hf of a MoE model: fused experts (transformers 5) or one module per expert (4.57)")
    p.add_argument("--types", default="f16", help="gguf: comma-separated f16,bf16,q8_0,q4_k_m (f16 always made)")
    p.add_argument("--eval-data", help="gguf: dataset whose eval split measures each file's perplexity")
    p.add_argument("--eval-ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--name", default="minimind", help="gguf: file name stem and general.name")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("inspect", help="load a MiniMind .pth strictly against its config; print the config")
    p.add_argument("src")
    p.add_argument("--config", help="JSON file of MiniMind config names")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("merge-lora", help="merge MiniMind's LoRA .pth into its base model (verified)")
    p.add_argument("base")
    p.add_argument("lora")
    p.add_argument("out")
    p.add_argument("--config", help="JSON file of the base model's MiniMind config names")
    p.set_defaults(func=cmd_merge_lora)
    p = sub.add_parser("chat-worker", help="JSON-lines generation server on stdin/stdout (playground, /v1 API)")
    p.add_argument("--listen", default="", help="also serve the node's web processes on this abstract Unix socket")
    p.add_argument("--slots", type=int, default=32, help="chats generated at once (the rest wait in fair turns)")
    p.add_argument("--per-user", type=int, default=4, help="requests one user may hold, running or waiting")
    p.add_argument("--models-gb", type=float, default=0,
                   help="weights kept loaded, in GiB (0: a quarter of the memory); a model in use always stays")
    p.set_defaults(func=cmd_chat_worker)
    p = sub.add_parser("prepare", help="build a dataset's token cache (training.token_cache)")
    p.add_argument("dataset")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--processing", required=True, choices=["pretrain", "sft", "dpo", "rl"])
    p.add_argument("--options", default="{}", help="the processing's options as JSON")
    p.add_argument("--cache", required=True, help="the cache root")
    p.add_argument("--sha256", default="")
    p.add_argument("--cap-gb", default="")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("warm", help="fork server: the engine imported once, a forked child per run (training.warm)")
    p.add_argument("fd", type=int, help="the Unix socket its supervisor sends runs on")
    p.add_argument("room", nargs="?", help="blank room in the command line for the children's titles")
    p.set_defaults(func=cmd_warm)
    args = parser.parse_args(argv)
    return args.func(args)


def cli(argv=None) -> int:
    """What ``python -m training ARGS`` does, as a function (the warm fork server's children call it too): the exit
    code of ``main``, a SIGUSR1 handler that prints every thread's stack (kill -USR1 PID: where a stuck process is),
    and the end of a torchrun rank."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        code = main(argv)
    except SystemExit as exc:  # a run stopped by a signal exits with EXIT_STOPPED
        code = exc.code
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():  # a rank of a torchrun run
        from .loop import leave_world

        leave_world(code)
    return code


if __name__ == "__main__":
    sys.exit(cli())
