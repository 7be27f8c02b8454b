import os
import secrets

from django.contrib.auth import get_user_model


def ensure_first_admin() -> tuple[str, str | None] | None:
    """Create a first superuser when there is none.

    Uses DJANGO_SUPERUSER_USERNAME/PASSWORD/EMAIL when set (as ``createsuperuser --noinput`` does), else ``admin`` with
    a random password. Returns (username, password) for a new admin (password None when it came from the
    environment), or None when an admin already existed.
    """
    User = get_user_model()
    if User.objects.filter(is_superuser=True).exists():
        return None
    username = os.environ.get("DJANGO_SUPERUSER_USERNAME") or "admin"
    env_password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
    password = env_password or secrets.token_urlsafe(12)
    User.objects.create_superuser(username=username, email=os.environ.get("DJANGO_SUPERUSER_EMAIL", ""),
                                  password=password)
    return username, None if env_password else password
