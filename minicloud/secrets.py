"""Secrets kept encrypted at rest (users' W&B / SwanLab keys, webhook signing secrets): Fernet (AES-128-CBC +
HMAC-SHA256, from ``cryptography``) with a key from ``MINICLOUD_SECRETS_KEY``, or derived from ``SECRET_KEY`` when
that is not set. A database dump alone does not reveal them; rotating the key makes the stored ones unreadable (their
owners enter them again)."""
from __future__ import annotations

import base64
import hashlib


def _fernet():
    from cryptography.fernet import Fernet
    from django.conf import settings

    material = settings.SECRETS_KEY or f"minicloud-secrets:{settings.SECRET_KEY}"
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(material.encode()).digest()))


def encrypt(text: str) -> str:
    return _fernet().encrypt(text.encode()).decode() if text else ""


def decrypt(token: str) -> str:
    """The plain text, or "" when there is none or the key changed since (InvalidToken)."""
    from cryptography.fernet import InvalidToken

    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        return ""
