"""Registering models and tokenizers. No torch here: the engine writes the files, the portal records them."""
from __future__ import annotations

import json
from pathlib import Path

from .models import ModelVersion, Tokenizer


def vocab_size_of(folder: Path) -> int:
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + sum(1 for t in data.get("added_tokens", [])
                                             if t["content"] not in data["model"]["vocab"])


def register_tokenizer(*, name: str, path: Path, owner=None, is_public=False) -> Tokenizer:
    tok, _ = Tokenizer.objects.update_or_create(
        name=name, owner=owner, defaults={"path": str(path), "is_public": is_public,
                                          "vocab_size": vocab_size_of(path)})
    return tok


def demo_tokenizer() -> Tokenizer | None:
    return Tokenizer.objects.filter(name="demo-tokenizer", is_public=True).first()


def register_job_output(job, *, model_path: str, model_config: dict, parameters: int, lora_path: str = "",
                        adapter_path: str = "") -> ModelVersion:
    """Record a finished job's final weights as a model version, with its lineage."""
    path = Path(model_path)
    return ModelVersion.objects.create(
        name=f"{job.name}-{job.stage}", owner=job.owner, stage=job.stage, job=job, parent=job.base_model,
        dataset=job.dataset, tokenizer=job.tokenizer, config=model_config, parameters=parameters, path=str(path),
        lora_path=lora_path, adapter_path=adapter_path, size_bytes=path.stat().st_size)


def lora_zip(mv: ModelVersion) -> Path:
    """A zip of the LoRA outputs: MiniMind's LoRA .pth and the peft adapter folder (built once, kept beside them)."""
    import zipfile

    out = Path(mv.lora_path).with_name("lora.zip")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(mv.lora_path, download_name(mv).replace(".pth", "_lora.pth"))
            for f in sorted(Path(mv.adapter_path).rglob("*")) if mv.adapter_path else []:
                if f.is_file():
                    zf.write(f, f"adapter/{f.relative_to(mv.adapter_path)}")
        tmp.replace(out)
    return out


def download_name(mv: ModelVersion) -> str:
    hidden = mv.config.get("hidden_size", "")
    moe = "_moe" if mv.config.get("use_moe") else ""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in mv.name)
    return f"{safe}_{hidden}{moe}.pth"


# --- tokenizers as first-class objects ----------------------------------------------------------------------------

MINIMIND_IDS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}


def _tokenizer_dir() -> Path:
    import uuid

    from django.conf import settings

    path = settings.HOME / "tokenizers" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def check_tokenizer_files(folder: Path) -> str | None:
    """Why a tokenizer folder cannot be used by MiniCloud's models, or None."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the library raises plain Exceptions for bad files
        return f"tokenizer.json: not a tokenizers file ({str(exc)[:200]})"
    for i, token in MINIMIND_IDS.items():
        if tok.id_to_token(i) != token:
            return (f"tokenizer.json: id {i} must be {token} (MiniMind's layout: pad, bos, eos), "
                    f"not {tok.id_to_token(i)!r}")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f"tokenizer_config.json: not valid JSON ({exc})"
    if not isinstance(config, dict):
        return "tokenizer_config.json: must be a JSON object"
    return None


def _new_tokenizer_name(owner, name: str) -> str:
    """A valid name that the owner has not used for a tokenizer yet."""
    from minicloud.errors import ServiceError

    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ServiceError("name: 1 to 100 characters", field="name")
    if Tokenizer.objects.filter(owner=owner, name=name).exists():
        raise ServiceError(f"name: you already have a tokenizer called {name!r}", field="name", status=409)
    return name


def upload_tokenizer(*, owner, name: str, tokenizer_json, tokenizer_config, request=None) -> Tokenizer:
    """Store an uploaded tokenizer (tokenizer.json + tokenizer_config.json, e.g. MiniMind's own). A config without a
    chat template gets MiniMind's (training/chat_template.jinja)."""
    import shutil

    from accounts.services import audit
    from minicloud.errors import ServiceError
    from training.tokenizer import CHAT_TEMPLATE

    name = _new_tokenizer_name(owner, name)
    if tokenizer_json is None or tokenizer_config is None:
        raise ServiceError("files: send tokenizer_json and tokenizer_config", field="tokenizer_json")
    folder = _tokenizer_dir()
    for upload, filename in ((tokenizer_json, "tokenizer.json"), (tokenizer_config, "tokenizer_config.json")):
        with open(folder / filename, "wb") as f:
            for chunk in upload.chunks():
                f.write(chunk)
    problem = check_tokenizer_files(folder)
    if problem:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServiceError(problem, field="tokenizer_json")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not config.get("chat_template"):
        config["chat_template"] = CHAT_TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                      encoding="utf-8")
    tok = register_tokenizer(name=name, path=folder, owner=owner)
    audit(owner, "tokenizer_upload", tok, request=request)
    return tok


def start_tokenizer_training(*, owner, name: str, dataset, vocab_size: int = 6400, request=None) -> Tokenizer:
    """Queue the training of a byte-level BPE tokenizer (MiniMind's reserved ids and chat template) on a dataset."""
    from django.db import transaction
    from django_q.tasks import async_task

    from accounts.services import audit
    from minicloud.errors import ServiceError

    name = _new_tokenizer_name(owner, name)
    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 200_000:
        raise ServiceError("vocab_size: between 300 and 200000", field="vocab_size")
    tok = Tokenizer.objects.create(name=name, owner=owner, path="", status="training", trained_on=dataset,
                                   vocab_size=vocab_size)
    audit(owner, "tokenizer_train", tok, request=request, dataset=dataset.pk, vocab_size=vocab_size)
    transaction.on_commit(lambda: async_task("models_registry.tasks.train_tokenizer", tok.pk,
                                             task_name=f"tokenizer-{tok.pk}", q_options={"ack_failure": True}))
    return tok


def train_tokenizer_now(tokenizer_id: int, max_records: int = 200_000) -> None:
    """The background part: read the dataset's texts (the first ``max_records`` records), train, register."""
    from jobs.validation import open_text, record_text
    from training.tokenizer import train_tokenizer

    tok = Tokenizer.objects.select_related("trained_on").get(pk=tokenizer_id)
    ds = tok.trained_on

    def texts():
        with open_text(ds.path) as f:
            for i, line in enumerate(f):
                if i >= max_records:
                    return
                if line.strip():
                    yield record_text(ds.kind, json.loads(line))

    try:
        folder = _tokenizer_dir()
        train_tokenizer(texts(), folder, vocab_size=tok.vocab_size)
    except Exception as exc:  # the task records why instead of vanishing
        Tokenizer.objects.filter(pk=tok.pk).update(status="failed", error=str(exc)[:2000])
        raise
    Tokenizer.objects.filter(pk=tok.pk).update(path=str(folder), status="ready", vocab_size=vocab_size_of(folder))


def encode(tok: Tokenizer, text: str) -> dict:
    """The playground: how a text splits into tokens and ids."""
    from training.tokenizer import load_tokenizer

    from minicloud.errors import ServiceError

    if tok.status != "ready":
        raise ServiceError(f"tokenizer {tok.name} is {tok.status}", status=409)
    hf = load_tokenizer(tok.path)
    enc = hf.encode(text[:20_000], add_special_tokens=False)
    return {"ids": enc.ids, "pieces": [hf.decode([i], skip_special_tokens=False) for i in enc.ids],
            "count": len(enc.ids), "characters": len(text[:20_000])}
