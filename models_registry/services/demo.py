"""The demo data every install has: the generated demo datasets and tokenizer, registered as public (run after migrate)."""
from __future__ import annotations

from django.conf import settings

from jobs.models import Dataset

from .tokenizers import register_tokenizer


def install_demo_data() -> None:
    """Generate the demo datasets and tokenizer (deterministic) and register them as public. Idempotent."""
    import hashlib

    from training.demo_data import DEMO_KINDS

    demo_dir = settings.HOME / "demo"
    missing = not (demo_dir / "demo-tokenizer" / "tokenizer.json").exists() or any(
        not (demo_dir / f"{name}.jsonl").exists() for name in DEMO_KINDS)
    if missing:
        from training.demo_data import iter_texts, write_demo_datasets
        from training.tokenizer import train_tokenizer

        paths = write_demo_datasets(demo_dir)
        train_tokenizer([t for p in paths.values() for t in iter_texts(p)], demo_dir / "demo-tokenizer")
    for name, kind in DEMO_KINDS.items():
        path = demo_dir / f"{name}.jsonl"
        data = path.read_bytes()
        Dataset.objects.update_or_create(
            name=name, owner=None,
            defaults={"kind": kind, "is_public": True, "path": str(path), "records": data.count(b"\n"),
                      "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    register_tokenizer(name="demo-tokenizer", path=demo_dir / "demo-tokenizer", is_public=True)
