"""Logins and failed logins go to the audit log."""
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver

from .services import audit


@receiver(user_logged_in)
def logged_in(sender, request, user, **kwargs):
    audit(user, "login", request=request)


@receiver(user_login_failed)
def login_failed(sender, credentials, request=None, **kwargs):
    audit(None, "login_failed", request=request, username=str(credentials.get("username", ""))[:150])
