from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def ensure_home() -> None:
    """The folders and the per-install secret key under MINICLOUD_HOME, made on the first start of any process
    (the settings module only reads them). What the portal writes is its own: every process creates files 0600 and
    folders 0700 (umask 077: the secret key, the SQLite file, datasets, models, logs), and MINICLOUD_HOME itself is
    0700, so no other account on the box reads a user's data through it."""
    import os
    import secrets

    os.umask(0o077)
    home = settings.HOME
    (home / "uploads").mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    try:
        settings.SECRET_KEY  # noqa: B018 -- given, or read from the key file by the settings
    except ImproperlyConfigured:  # empty: this is the install's first start
        key_file = home / "secret_key"
        try:
            with open(key_file, "x") as f:  # the first process to start writes it; the others read it
                f.write(secrets.token_urlsafe(50))
        except FileExistsError:
            pass
        settings.SECRET_KEY = key_file.read_text().strip()


class MinicloudConfig(AppConfig):
    name = "minicloud"
    verbose_name = "MiniCloud"

    def ready(self):
        ensure_home()
