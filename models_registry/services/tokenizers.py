"""Tokenizers as first-class objects: registered, uploaded (checked for MiniMind's reserved ids), trained from a
dataset, and the encode playground."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils.translation import gettext as _

from accounts.services import audit, check_deletable, check_storage
from jobs.models import Job
from jobs.services import background_task, this_worker
from jobs.validation import open_text, record_text
from training.records import loads
from minicloud.errors import ServiceError, clean_name
from minicloud.files import disk_usage, save_upload

from ..models import ModelVersion, Tokenizer


def vocab_size_of(folder: Path) -> int:
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + sum(1 for t in data.get("added_tokens", [])
                                             if t["content"] not in data["model"]["vocab"])


def register_tokenizer(*, name: str, path: Path, owner=None, is_public=False) -> Tokenizer:
    tok, _created = Tokenizer.objects.update_or_create(
        name=name, owner=owner, defaults={"path": str(path), "is_public": is_public, "vocab_size": vocab_size_of(path),
                                          "size_bytes": disk_usage(path)}
    )
    return tok


MINIMIND_IDS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}


def _tokenizer_dir() -> Path:
    import uuid


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
    name = clean_name(name, 100)
    if Tokenizer.objects.filter(owner=owner, name=name).exists():
        raise ServiceError(
            _("name: you already have a tokenizer called %(name)s") % {"name": repr(name)}, field="name", status=409
        )
    return name


def upload_tokenizer(*, owner, name: str, tokenizer_json, tokenizer_config, request=None) -> Tokenizer:
    """Store an uploaded tokenizer (tokenizer.json + tokenizer_config.json, e.g. MiniMind's own). A config without a
    chat template gets MiniMind's (training/chat_template.jinja)."""
    import shutil

    from training.tokenizer import CHAT_TEMPLATE

    name = _new_tokenizer_name(owner, name)
    if tokenizer_json is None or tokenizer_config is None:
        raise ServiceError(_("files: send tokenizer_json and tokenizer_config"), field="tokenizer_json")
    for field, upload in (("tokenizer_json", tokenizer_json), ("tokenizer_config", tokenizer_config)):
        if upload.size > settings.TOKENIZER_MAX_BYTES:  # the check below parses it in this web process
            raise ServiceError(_("%(field)s: larger than the %(mb)s MB a tokenizer file may be") % {
                "field": field, "mb": format(settings.TOKENIZER_MAX_BYTES / 1e6, "g")}, field=field, status=413)
    check_storage(owner, adding=tokenizer_json.size + tokenizer_config.size)
    folder = _tokenizer_dir()
    for upload, filename in ((tokenizer_json, "tokenizer.json"), (tokenizer_config, "tokenizer_config.json")):
        save_upload(upload, folder / filename)
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

    name = _new_tokenizer_name(owner, name)
    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 200_000:
        raise ServiceError(_("vocab_size: between 300 and 200000"), field="vocab_size")
    check_storage(owner)  # nothing more once the storage quota is full
    limit = settings.TOKENIZER_TRAININGS_PER_USER  # the node's background worker is everyone's
    if Tokenizer.objects.filter(owner=owner, status="training").count() >= limit:
        raise ServiceError(_("you already have %(n)s tokenizers training: start another once one has finished")
                           % {"n": limit}, status=429)
    tok = Tokenizer.objects.create(name=name, owner=owner, path="", status="training", trained_on=dataset,
                                   vocab_size=vocab_size)
    audit(owner, "tokenizer_train", tok, request=request, dataset=dataset.pk, vocab_size=vocab_size)
    transaction.on_commit(lambda: background_task("models_registry.tasks.train_tokenizer", tok.pk,
                                                  task_name=f"tokenizer-{tok.pk}"))
    return tok


def train_tokenizer_now(tokenizer_id: int, max_records: int = 200_000) -> None:
    """The background part: read the dataset's texts (the first ``max_records`` records), train, register."""
    from training.tokenizer import train_tokenizer

    tok = Tokenizer.objects.select_related("trained_on").filter(pk=tokenizer_id).first()
    if tok is None or not Tokenizer.objects.filter(pk=tok.pk, status="training", worker="").update(
            worker=this_worker()):  # deleted while queued: nothing to do. Named until it ends (reconcile_background)
        return
    ds = tok.trained_on

    def texts():
        with open_text(ds.path) as f:
            for i, line in enumerate(f):
                if i >= max_records:
                    return
                if line.strip():
                    yield record_text(ds.kind, loads(line))

    try:
        folder = _tokenizer_dir()
        train_tokenizer(texts(), folder, vocab_size=tok.vocab_size)
    except Exception as exc:  # the task records why instead of vanishing
        Tokenizer.objects.filter(pk=tok.pk).update(status="failed", error=str(exc)[:2000], worker="")
        raise
    Tokenizer.objects.filter(pk=tok.pk).update(path=str(folder), status="ready", vocab_size=vocab_size_of(folder),
                                               size_bytes=disk_usage(folder), worker="")


def tokenizer_references(tok: Tokenizer) -> list[str]:
    """What uses a tokenizer: jobs (any state: their runs and checkpoints read it) and models that speak it."""
    refs = [f"job #{pk} {name}" for pk, name in
            Job.objects.filter(tokenizer=tok).order_by("pk").values_list("pk", "name")[:50]]
    refs += [f"model #{pk} {name} v{version}" for pk, name, version in
             ModelVersion.objects.filter(tokenizer=tok).order_by("pk").values_list("pk", "name", "version")[:50]]
    return refs


def delete_tokenizer(actor, tok: Tokenizer, request=None) -> None:
    """Delete a tokenizer nothing uses, with its folder: one that failed, one its owner no longer wants, or one whose
    training is still queued (its task then finds nothing to do; a task lost with its node ends no other way). Not
    while a worker trains it (it would write a folder nothing names)."""
    import shutil

    check_deletable(actor, tok, tokenizer_references(tok))
    if tok.status == "training" and tok.worker:
        raise ServiceError(_("tokenizer %(name)s is still training: delete it once it has finished")
                           % {"name": tok.name}, status=409)
    folder = Path(tok.path) if tok.path else None
    audit(actor, "delete", tok, request=request, name=tok.name)
    tok.delete()
    if folder is not None and folder.parent == settings.HOME / "tokenizers":
        shutil.rmtree(folder, ignore_errors=True)


def encode(tok: Tokenizer, text: str) -> dict:
    """The playground: how a text splits into tokens and ids."""
    from training.tokenizer import load_tokenizer


    if tok.status != "ready":
        raise ServiceError(_("tokenizer %(name)s is %(status)s") % {"name": tok.name, "status": tok.get_status_display()},
                           status=409)
    hf = load_tokenizer(tok.path)
    enc = hf.encode(text[:20_000], add_special_tokens=False)
    pieces, fragments = [], []
    for n, i in enumerate(enc.ids):
        piece = hf.decode([i], skip_special_tokens=False)
        if "\ufffd" in piece:  # a byte-level token holding part of a character's UTF-8 bytes
            piece = _byte_notation(hf.id_to_token(i))
            fragments.append(n)
        pieces.append(piece)
    return {"ids": enc.ids, "pieces": pieces, "fragments": fragments, "count": len(enc.ids),
            "characters": len(text[:20_000])}


@functools.cache
def _byte_of_character() -> dict:
    """GPT-2's byte-level alphabet inverted: the byte each of its 256 printable characters stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_notation(token: str) -> str:
    """A byte-level BPE token (GPT-2's alphabet: one printable character per byte, as MiniMind's tokenizer stores
    them) written as its bytes, ``<0xE4><0xBD>``, the notation of SentencePiece's byte tokens; a token of any other
    alphabet is shown as stored."""
    to_byte = _byte_of_character()
    if not token or any(c not in to_byte for c in token):
        return token
    return "".join(f"<0x{to_byte[c]:02X}>" for c in token)
