"""How long loading a MiniMind ``.pth`` takes, as JSON: ``training.model.load_model`` (the weights allocated without
transformers' random initialisation, then loaded) beside the previous way (the model built with its random
initialisation, then the same file loaded over it), in the same process, at MiniMind-3's shapes (768 wide, 8 layers;
dense and MoE), random weights saved first. Every load the engine makes goes this way: the chat worker's models, a
job's base model and teacher, conversions, evaluations.

    python bench/model_load.py                 # 5 loads each, dense and MoE
    python bench/model_load.py --repeat 3 --threads 1
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import torch
    import transformers

    from training.model import build_model, load_model, load_pth, save_pth
    from training.spec import model_config, resolve_config

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"bench": "model_load", "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for moe in (False, True):
            arch = {"hidden_size": 768, "num_hidden_layers": 8, "use_moe": moe}
            mcfg = model_config(resolve_config("pretrain", arch))
            path = Path(tmp) / f"{'moe' if moe else 'dense'}.pth"
            save_pth(build_model(mcfg), path)

            def previous():
                model = build_model(mcfg)
                load_pth(model, path)

            def new():
                load_model({"path": str(path), "config": arch})

            times = {"previous": [], "new": []}
            for _ in range(args.repeat):  # alternately
                for name, load in (("previous", previous), ("new", new)):
                    start = time.perf_counter()
                    load()
                    times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(t) for name, t in times.items()}
            out["cases"].append({"model": "moe" if moe else "dense", "file_mb": round(path.stat().st_size / 1e6, 1),
                                 "previous_s": round(med["previous"], 3), "new_s": round(med["new"], 3),
                                 "speedup": round(med["previous"] / med["new"], 2),
                                 "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
