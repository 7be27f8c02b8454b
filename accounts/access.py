"""Who may read and who may manage an object: the one access layer that every entry point asks (pages, the API,
the WebSocket consumers, management commands), so that they cannot diverge. The rules live on the shared base of
the objects (accounts.models.Shareable and its VisibleQuerySet: ``visible_to``, ``manageable_by``); the user's role
is ``role_of``. docs/architecture.md, "Access"."""
from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.utils.translation import gettext as _

from minicloud.errors import ServiceError, id_or_none

from .models import Profile


class NotFound(ServiceError, Http404):
    """Nothing the user may read has this id: a 404 page in a view, a JSON 404 from the API (never "forbidden": that
    would tell a stranger the object exists)."""

    def __init__(self, message):
        super().__init__(message, status=404)


class Forbidden(ServiceError, PermissionDenied):
    """The user may read the object but not change it: a 403 page, or a JSON 403."""

    def __init__(self, message):
        super().__init__(message, status=403)


def readable(model, user, pk, *related):
    """The ``model`` object with id ``pk`` (as a client sent it) that ``user`` may read, with ``related`` joined;
    NotFound otherwise."""
    obj = model.objects.select_related(*related).filter(pk=id_or_none(pk)).first()
    if obj is None or not obj.readable_by(user):
        raise NotFound(_("No such %(what)s (id %(id)s).") % {"what": model._meta.verbose_name, "id": pk})
    return obj


def readable_ids(model, user, pks) -> set:
    """Which of the ``model`` ids ``pks`` ``user`` may read (``readable`` for many at once, one query)."""
    return set(model.objects.visible_to(user).filter(pk__in=list(pks)).values_list("pk", flat=True))


def may_manage(user, obj) -> bool:
    """Whether ``user`` may change, cancel, share or delete ``obj`` (its owner, or an admin)."""
    if user.is_superuser or (obj.owner_id is not None and obj.owner_id == user.pk):
        return True
    return type(obj).objects.manageable_by(user).filter(pk=obj.pk).exists()


def manageable(model, user, pk, *related):
    """``readable``, and Forbidden unless ``user`` may also manage it."""
    obj = readable(model, user, pk, *related)
    check_manage(user, obj)
    return obj


def check_manage(user, obj) -> None:
    if not may_manage(user, obj):
        raise Forbidden(_("Only the %(what)s's owner can do that.") % {"what": type(obj)._meta.verbose_name})


def connection_user(user_id, token_digest=None, session=None):
    """The user of a live connection (a WebSocket) if what it connected with still holds — the account is active,
    its API token not revoked, its login session not ended — else None. Live connections ask this now and then
    (with ``readable`` for what they stream), so that access taken away ends a stream already open."""
    from django.contrib.auth import get_user_model

    from .models import ApiToken

    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return None
    if token_digest is not None:
        return user if ApiToken.objects.filter(digest=token_digest, user=user).exists() else None
    if session is not None and session.session_key and not session.exists(session.session_key):
        return None
    return user


def role_of(user) -> str:
    """``admin`` (a superuser), ``instructor`` or ``member``: the one role rule (pages, ``GET /api/v1/me``)."""
    if user.is_superuser:
        return "admin"
    profile = Profile.objects.filter(user=user).first()
    return profile.role if profile else Profile.Role.MEMBER
