"""An in-process portal for a benchmark: a new temporary MINICLOUD_HOME, the SQLite default (no DATABASE_URL or
REDIS_URL from the shell), migrated, Django set up."""
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_portal(prefix: str) -> Path:
    """Set up Django on a fresh database in a new home named ``prefix``…; returns the home."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(MINICLOUD_HOME=str(home), DJANGO_SETTINGS_MODULE="minicloud.settings")
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return home


def minimind3_pth(path: Path) -> dict:
    """A random model of MiniMind-3's shape (768 wide, 8 layers; seed 0) saved as a MiniMind .pth at ``path``; its
    config. Needs no Django."""
    import torch

    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    torch.manual_seed(0)
    mcfg = model_config(resolve_config("pretrain", {"hidden_size": 768, "num_hidden_layers": 8}))
    save_pth(build_model(mcfg), path)
    return mcfg


def minimind3_chat_model(home: Path) -> dict:
    """``minimind3_pth`` saved under ``home``, as the generation worker's model entry (with the demo tokenizer)."""
    from models_registry.models import Tokenizer

    weights = home / "minimind3.pth"
    return {"path": str(weights), "config": minimind3_pth(weights), "tokenizer": Tokenizer.demo().path}
