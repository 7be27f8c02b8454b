"""Accounts: quotas and their week, storage used, usage records and reports, the audit log, groups and their
instructors, sharing, bulk user creation and login throttling. Access checks: accounts/access.py."""
import csv
import io
import ipaddress
import math
import os
import secrets
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from minicloud.db.writes import add
from minicloud.errors import ServiceError, clean_name, id_or_none

from .access import may_manage, role_of  # noqa: F401 -- role_of: also a public name here
from .models import LIMIT_FIELDS, QUOTA_FIELDS, AuditEntry, GroupInfo, GroupInvitation, GroupLimit, Quota, UsageRecord


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


# --- quotas and usage ---------------------------------------------------------------------------------------------

def effective_quota(user) -> dict:
    """Each quota field for ``user``: their own value, else the most generous of their groups', else None (no
    limit) — the admins' values; then each of their groups' instructor limits (``GroupLimit``) can only lower it.
    Staff accounts (admins) are not limited."""
    return effective_quotas([user])[user.pk]


def effective_quotas(users) -> dict:
    """``effective_quota`` of many users at once ({user id: quotas}), in three queries whatever their number (their
    groups; their own and their groups' quotas; their groups' instructor limits), two for one user (their groups are
    a subquery of the other two: each query is a round trip to PostgreSQL, and a submission checks its owner's), none
    for staff."""
    users = list(users)
    ids = [u.pk for u in users if not u.is_staff]
    member_of = get_user_model().groups.through.objects.filter(user_id__in=ids)
    groups = member_of.values("group_id")  # a subquery of the two reads below
    own, by_group = {}, {}
    for q in Quota.objects.filter(Q(user_id__in=ids) | Q(group_id__in=groups)) if ids else ():
        (own if q.user_id is not None else by_group)[q.user_id or q.group_id] = q
    tightening = {gl.group_id: gl for gl in GroupLimit.objects.filter(group_id__in=groups)} if ids else {}
    membership = {}
    if len(ids) == 1:  # every group quota and limit read is one of this user's groups
        membership[ids[0]] = list(by_group.keys() | tightening.keys())
    else:
        for user_id, group_id in member_of.values_list("user_id", "group_id"):
            membership.setdefault(user_id, []).append(group_id)
    out = {}
    for user in users:
        out[user.pk] = limits = dict.fromkeys(QUOTA_FIELDS)
        if user.is_staff:
            continue
        groups = [by_group[g] for g in membership.get(user.pk, ()) if g in by_group]
        for field in QUOTA_FIELDS:
            value = getattr(own[user.pk], field) if user.pk in own else None
            if value is None:
                values = [getattr(q, field) for q in groups]
                # A group without a limit on this field lifts it; else the most generous group wins.
                value = None if not values or None in values else max(values)
            limits[field] = value
        for gl in (tightening[g] for g in membership.get(user.pk, ()) if g in tightening):
            for field in LIMIT_FIELDS:
                lower = getattr(gl, field)
                if lower is not None and (limits[field] is None or lower < limits[field]):
                    limits[field] = lower
    return out


def week_start(now=None):
    """Monday 00:00 of this week, in the server's time zone: device-hour quotas count from there."""
    now = timezone.localtime(now or timezone.now())
    return (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)


def usage_by_day(user, days: int = 56) -> list[tuple[str, float]]:
    """(date, device-hours) for each of the last ``days`` days, attributed to the day each segment ended."""
    start = timezone.localdate() - timedelta(days=days - 1)
    totals = {start + timedelta(days=i): 0.0 for i in range(days)}
    for r in UsageRecord.objects.filter(user=user, ended_at__date__gte=start):
        day = timezone.localdate(r.ended_at)
        if day in totals:
            totals[day] += r.device_seconds / 3600
    return [(d.isoformat(), round(h, 4)) for d, h in totals.items()]


# --- audit --------------------------------------------------------------------------------------------------------

def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(net, strict=False) for net in settings.TRUSTED_PROXIES)
    except ValueError:
        return False


def client_ip(request):
    """The client's address: the peer's, or behind a trusted proxy (settings.TRUSTED_PROXIES) the nearest address
    in X-Forwarded-For that is not one of those proxies (each proxy appends the address it got the request from;
    anything further left is the client's own word)."""
    if request is None:
        return None
    peer = request.META.get("REMOTE_ADDR")
    if not peer or not _trusted(peer):
        return peer
    for hop in reversed(request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")):
        hop = hop.strip()
        if hop and not _trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer


def audit(actor, action: str, obj=None, *, request=None, username: str = "", **detail) -> None:
    """Record one audited action. ``actor`` may be None (a failed login names ``username``)."""
    user = actor if getattr(actor, "is_authenticated", False) else None
    add(AuditEntry(actor=user, username=username or (user.username if user else ""), action=action,
                   object_type=obj._meta.model_name if obj is not None else "",
                   object_id=str(obj.pk) if obj is not None else "", ip=client_ip(request), detail=detail))


def storage_used(user) -> int:
    """Bytes the user stores: the sum of what every kind of object that keeps files says it keeps on disk for them
    (``stored_bytes``: datasets, jobs' run folders, imported and merged models and their conversions, tokenizers and
    unfinished uploads: a model of any app that defines it is counted, without accounts knowing the kinds)."""
    return sum(model.stored_bytes(user) for model in apps.get_models() if callable(getattr(model, "stored_bytes", None)))


def storage_room(user, quota: dict | None = None) -> int | None:
    """Bytes ``user`` may still store (0 once full), or None without a storage quota."""
    limit = (quota or effective_quota(user))["storage_gb"]
    return None if limit is None else max(int(limit * 1e9) - storage_used(user), 0)


def check_storage(user, adding: int = 0, quota: dict | None = None) -> None:
    """Refuse (403, naming the quota) storing ``adding`` more bytes — or anything more, with 0 — once the user's
    storage quota would be passed. Checked by every path that stores files: job submission, dataset uploads (each
    chunk of a resumable one), model imports and merges."""
    limit = (quota or effective_quota(user))["storage_gb"]
    if limit is None:
        return
    used = storage_used(user)
    if used >= limit * 1e9 or used + adding > limit * 1e9:
        more = _("; this adds %(gb)s GB") % {"gb": f"{adding / 1e9:.2f}"} if adding else ""
        raise ServiceError(
            _("quota: you store %(used)s GB of your %(limit)s GB%(more)s; delete old jobs, models or datasets first")
            % {"used": format(used / 1e9, ".2f"), "limit": format(limit, "g"), "more": more},
            status=403,
            field="quota",
        )


def usage_report(since, until) -> list[dict]:
    """Device-hours per user (and their groups) between two times, for the admin's CSV report."""
    rows = {}
    for r in UsageRecord.objects.filter(ended_at__gt=since, started_at__lt=until).select_related("user"):
        length = (r.ended_at - r.started_at).total_seconds()
        inside = (min(r.ended_at, until) - max(r.started_at, since)).total_seconds()
        hours = r.device_seconds * (inside / length if length > 0 else 1.0) / 3600
        row = rows.setdefault(r.user_id, {"username": r.user.username,
                                          "groups": " ".join(sorted(g.name for g in r.user.groups.all())),
                                          "jobs": set(), "device_hours": 0.0})
        row["device_hours"] += hours
        if r.job_id:
            row["jobs"].add(r.job_id)
    return [{**row, "jobs": len(row["jobs"]), "device_hours": round(row["device_hours"], 4)}
            for row in sorted(rows.values(), key=lambda x: x["username"])]


# --- roles, groups and sharing ------------------------------------------------------------------------------------

def manages_group(user, group) -> bool:
    return user.is_superuser or group_instructors(group).filter(pk=user.pk).exists()


def group_instructors(group):
    return get_user_model().objects.filter(instructed_groups__group=group)


def groups_of(user):
    """The groups ``user`` belongs to or instructs (every group for an admin)."""
    if user.is_superuser:
        return Group.objects.order_by("name")
    return Group.objects.filter(Q(user=user) | Q(info__instructors=user)).distinct().order_by("name")


def create_group(actor, name: str, description: str = "", request=None):
    """An instructor (or admin) creates a group and instructs it."""


    if role_of(actor) not in ("admin", "instructor"):
        raise ServiceError(_("only instructors and admins create groups"), status=403)
    name = clean_name(name, 150)
    if Group.objects.filter(name=name).exists():
        raise ServiceError(
            _("name: a group called %(name)s exists already") % {"name": repr(name)}, field="name", status=409
        )
    group = Group.objects.create(name=name)
    info = GroupInfo.objects.create(group=group, description=description[:500])
    info.instructors.add(actor)
    audit(actor, "group_create", group, request=request)
    return group


def _managed(actor, group):
    if not manages_group(actor, group):
        raise ServiceError(_("only the group's instructors and admins manage it"), status=403)


def add_member(actor, group, username: str, request=None) -> tuple[object, bool]:
    """An admin adds a user to a group; an instructor invites them (they join when they accept: ``answer_invitation``).
    Returns (the user, whether they are a member now)."""
    _managed(actor, group)
    user = get_user_model().objects.filter(username=(username or "").strip(), is_active=True).first()
    if user is None:
        raise ServiceError(
            _("username: no active user %(username)s") % {"username": repr(username)}, field="username", status=404
        )
    if actor.is_superuser:
        user.groups.add(group)
        GroupInvitation.objects.filter(group=group, user=user).delete()
        audit(actor, "group_add_member", group, request=request, member=user.username)
        return user, True
    if group.user_set.filter(pk=user.pk).exists():
        return user, True
    GroupInvitation.objects.get_or_create(group=group, user=user, defaults={"invited_by": actor})
    audit(actor, "group_invite", group, request=request, member=user.username)
    return user, False


def invitations_of(user):
    return GroupInvitation.objects.filter(user=user).select_related("group", "invited_by").order_by("created_at")


def answer_invitation(user, invitation_id, accept: bool, request=None):
    """The invited user joins the group (``accept``) or declines; only they can."""
    invitation = GroupInvitation.objects.filter(pk=id_or_none(invitation_id), user=user).select_related("group").first()
    if invitation is None:
        raise ServiceError(_("No such invitation."), status=404)
    if accept:
        user.groups.add(invitation.group)
    audit(user, "group_join" if accept else "group_decline", invitation.group, request=request)
    invitation.delete()
    return invitation.group


def remove_member(actor, group, user, request=None) -> None:
    _managed(actor, group)
    user.groups.remove(group)
    audit(actor, "group_remove_member", group, request=request, member=user.username)


def set_group_quota(actor, group, values: dict, request=None):
    """An admin sets the group's quota (its members' default, priority included); an instructor sets the group's
    ``GroupLimit``, which only lowers what admins gave its members and has no priority."""
    _managed(actor, group)
    if actor.is_superuser:
        quota, fields = Quota.objects.get_or_create(group=group)[0], QUOTA_FIELDS
    else:
        if values.get("priority") is not None:
            raise ServiceError(_("priority: only admins give priority"), status=403, field="priority")
        quota, fields = GroupLimit.objects.get_or_create(group=group)[0], LIMIT_FIELDS
        quota.set_by = actor
    for key in fields:
        if key in values:
            setattr(quota, key, values[key])
    quota.save()
    audit(actor, "quota_change", quota, request=request, fields={k: values[k] for k in fields if k in values})
    return quota


def set_visibility(actor, obj, visibility: str, group=None, request=None):
    """Make one of the actor's objects private, shared with one of their groups, or public."""
    if not type(obj).objects.manageable_by(actor).filter(pk=obj.pk).exists():
        raise ServiceError(_("only the owner can share it"), status=403)
    if visibility not in ("private", "group", "public"):
        raise ServiceError(_("visibility: private, group or public"), field="visibility")
    if visibility == "group":
        if group is None or not groups_of(actor).filter(pk=group.pk).exists():
            raise ServiceError(_("group: one of your groups"), field="group")
    obj.is_public = visibility == "public"
    obj.shared_with = group if visibility == "group" else None
    obj.save(update_fields=["is_public", "shared_with"])
    audit(actor, "share", obj, request=request, visibility=visibility, group=group.name if group else None)
    return obj


def share_context(user, obj) -> dict:
    """What the share widget of an object page needs."""
    can = may_manage(user, obj)
    return {"can_share": can, "share_groups": list(groups_of(user)) if can else []}


# --- bulk import, login limits, tokens ------------------------------------------------------------------------------

def bulk_create_users(rows, actor=None, request=None) -> list[dict]:
    """Create users from CSV rows (``username``, ``name``, ``email``, ``group``) with generated passwords, which are
    returned once and never stored in clear. All or nothing: the first bad row refuses the whole file."""
    User = get_user_model()
    rows = list(rows)
    seen = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        username = (row.get("username") or "").strip()
        if not username:
            raise ServiceError(_("line %(line)s: username is empty") % {"line": line}, field="file")
        if username in seen or User.objects.filter(username=username).exists():
            raise ServiceError(
                _("line %(line)s: user %(username)s exists already") % {"line": line, "username": repr(username)},
                field="file",
            )
        seen.add(username)
    created = []
    with transaction.atomic():
        for row in rows:
            username = row["username"].strip()
            first, _sep, last = (row.get("name") or "").strip().partition(" ")
            password = secrets.token_urlsafe(9)
            user = User.objects.create_user(username, email=(row.get("email") or "").strip(), password=password,
                                            first_name=first[:150], last_name=last[:150])
            group_name = (row.get("group") or "").strip()
            if group_name:
                group, _new = Group.objects.get_or_create(name=group_name)
                user.groups.add(group)
            created.append({"username": username, "password": password, "group": group_name})
        audit(actor, "users_import", request=request, usernames=[c["username"] for c in created])
    return created


def read_users_csv(text: str) -> list[dict]:

    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "username" not in [f.strip() for f in reader.fieldnames]:
        raise ServiceError(_("file: a CSV with a header line: username,name,email,group"), field="file")
    return [{(k or "").strip(): v for k, v in row.items()} for row in reader]


def login_wait(username: str, ip) -> int:
    """Seconds before another login may be tried for ``username`` from address ``ip`` (0: now). Failures count
    within settings.LOGIN_FAILURE_WINDOW_S for the pair (username, address) — so a classmate's typos or an attacker
    elsewhere never lock a user out — and, five times as many, for the address alone (one client guessing many
    names). Past LOGIN_MAX_FAILURES each further failure doubles the wait, from 1 s to at most the window."""
    now = timezone.now()
    since = now - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_S)
    failures = AuditEntry.objects.filter(action="login_failed", time__gte=since)
    limit = settings.LOGIN_MAX_FAILURES
    wait = 0
    for times, threshold in ((failures.filter(username=username, ip=ip), limit),
                             (failures.filter(ip=ip) if ip else failures.none(), 5 * limit)):
        failed = times.count()
        if failed < threshold:
            continue
        backoff = min(2 ** min(failed - threshold, 30), settings.LOGIN_FAILURE_WINDOW_S)
        wait = max(wait, math.ceil(backoff - (now - times.latest("time").time).total_seconds()))
    return wait


def check_deletable(actor, obj, references: list[str]) -> None:
    """Refuse to delete ``obj`` unless ``actor`` owns (manages) it and nothing uses it (``references`` names what
    does: 409 with the list). The message names the kind of ``obj`` in the active language (its verbose name)."""
    kind = type(obj)._meta.verbose_name
    if not may_manage(actor, obj) or obj.owner_id is None:
        raise ServiceError(_("only the owner can delete this %(kind)s") % {"kind": kind}, status=403)
    if references:
        raise ServiceError(
            _("%(kind)s is in use by %(n)s object(s): %(references)s")
            % {"kind": kind, "n": len(references), "references": ", ".join(references[:10])},
            status=409,
            details={"references": references},
        )
