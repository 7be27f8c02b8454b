import hashlib
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy as _

from minicloud.errors import ServiceError, id_or_none


class Profile(models.Model):
    """A user's role: members see their own objects and what is shared with their groups; instructors also create
    groups, manage the groups they instruct and see their members' objects. Admins are Django superusers."""

    class Role(models.TextChoices):
        MEMBER = "member", _("member / student")
        INSTRUCTOR = "instructor", _("instructor")

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    role = models.CharField(_("role"), max_length=20, choices=Role.choices, default=Role.MEMBER)

    def __str__(self):
        return f"{self.user} ({self.role})"


class GroupInfo(models.Model):
    """What MiniCloud adds to a Django group (a course, a project): its instructors."""

    group = models.OneToOneField("auth.Group", on_delete=models.CASCADE, related_name="info")
    instructors = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="instructed_groups")
    description = models.CharField(_("description"), max_length=500, blank=True)

    def __str__(self):
        return str(self.group)


class VisibleQuerySet(models.QuerySet):
    def visible_to(self, user):
        """What ``user`` may read: public objects, their own, those shared with one of their groups, and for an
        instructor the objects of the members of the groups they instruct (everything for an admin)."""
        if user.is_superuser:
            return self.all()
        # One query: the user's groups and their instructed groups' members are subqueries of it, not reads of their
        # own (on PostgreSQL each read is a round trip, and a burst's requests wait on them), and matching owners by
        # ``IN`` rather than by a join repeats no row, so no DISTINCT is needed (it compared every column).
        membership = get_user_model().groups.through.objects
        groups = membership.filter(user=user).values("group_id")
        instructed = GroupInfo.objects.filter(instructors=user).values("group_id")
        return self.filter(Q(is_public=True) | Q(owner=user) | Q(shared_with__in=groups)
                           | Q(owner__in=membership.filter(group_id__in=instructed).values("user_id")))

    def usable_by(self, user, pk, field: str, required: bool = False):
        """The object with id ``pk`` (as a client sent it: an integer or its digits) that ``user`` may read; None when
        nothing was sent and it is not ``required``. Anything else is a ServiceError naming ``field``."""
        if pk in (None, "") and not required:
            return None
        found = self.visible_to(user).filter(pk=id_or_none(pk)).first()
        if found is None:
            raise ServiceError(gettext("%(field)s: no %(verbose_name)s with id %(pk)s that you can use")
                               % {"field": field, "verbose_name": self.model._meta.verbose_name, "pk": repr(pk)},
                               field=field)
        return found

    def manageable_by(self, user):
        """What ``user`` may change, cancel, share or delete: their own objects (everything for an admin)."""
        return self.all() if user.is_superuser else self.filter(owner=user)


class Shareable(models.Model):
    """Private (the owner's), shared with one group, or public to every user."""

    is_public = models.BooleanField(_("public"), default=False)
    shared_with = models.ForeignKey("auth.Group", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+", verbose_name=_("shared with group"))

    objects = VisibleQuerySet.as_manager()

    class Meta:
        abstract = True

    @classmethod
    def stored_bytes(cls, user) -> int:
        """Bytes of files that objects of this kind owned by ``user`` keep on disk (their storage quota): the sum of
        their ``size_bytes`` where the kind has that field and nothing else on disk (datasets, tokenizers), else 0;
        a kind that stores files otherwise says how (accounts.services.storage_used adds them up without knowing
        the kinds)."""
        if not any(f.name == "size_bytes" for f in cls._meta.concrete_fields):
            return 0
        return cls.objects.filter(owner=user).aggregate(n=models.Sum("size_bytes"))["n"] or 0

    def readable_by(self, user) -> bool:
        """``visible_to`` for one object: the common cases (an admin, the owner, a public object) without a query."""
        if user.is_superuser or self.is_public or self.owner_id == user.pk:
            return True
        return type(self).objects.visible_to(user).filter(pk=self.pk).exists()

    @property
    def visibility(self) -> str:
        return "public" if self.is_public else ("group" if self.shared_with_id else "private")

    @property
    def visibility_label(self) -> str:
        """Who sees it, in the active language (the group named)."""
        if self.is_public:
            return gettext("public")
        if self.shared_with_id:
            return gettext("shared with %(name)s") % {"name": self.shared_with.name}
        return gettext("private")

    def sharing_dict(self) -> dict:
        return {"visibility": self.visibility, "is_public": self.is_public,
                "shared_with": self.shared_with.name if self.shared_with_id else None}


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token for the HTTP API. Only its SHA-256 is stored; the raw token is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(_("name"), max_length=100, default="api")
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=8)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("API token")
        verbose_name_plural = _("API tokens")

    def __str__(self):
        return f"{self.user} {self.prefix}…"

    @classmethod
    def issue(cls, user, name="api") -> tuple["ApiToken", str]:
        raw = "mc_" + secrets.token_urlsafe(32)
        return cls.objects.create(user=user, name=name, digest=hash_token(raw), prefix=raw[:8]), raw

    LAST_USED_RESOLUTION_S = 60

    @classmethod
    def user_for(cls, raw: str):
        """The active user owning ``raw``, or None. ``last_used_at`` is kept to the minute: written only when the
        stored time is older, so that a client's burst of requests is not a burst of writes (on SQLite every write
        waits for the one writer)."""
        token = cls.objects.select_related("user").filter(digest=hash_token(raw)).first()
        if token is None or not token.user.is_active:
            return None
        now = timezone.now()
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > cls.LAST_USED_RESOLUTION_S:
            cls.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user


LIMIT_FIELDS = ("max_running_jobs", "max_queued_jobs", "max_gpus_per_job", "device_hours_per_week", "max_job_hours",
                "storage_gb")
QUOTA_FIELDS = (*LIMIT_FIELDS, "priority")


class Limits(models.Model):
    """The limits a quota sets (an empty field: not limited here)."""

    max_running_jobs = models.PositiveIntegerField(_("concurrent running jobs"), null=True, blank=True)
    max_queued_jobs = models.PositiveIntegerField(_("queued jobs"), null=True, blank=True)
    max_gpus_per_job = models.PositiveIntegerField(_("devices per job"), null=True, blank=True)
    device_hours_per_week = models.FloatField(_("device-hours per week"), null=True, blank=True)
    max_job_hours = models.FloatField(_("job wall-clock limit (hours)"), null=True, blank=True)
    storage_gb = models.FloatField(_("storage (GB)"), null=True, blank=True)

    class Meta:
        abstract = True


class Quota(Limits):
    """An admin's limits for one user or, as the default of its members, one group: a user's own value wins, else
    the most generous of their groups' values, else no limit. Only admins set quotas and priority (the admin, and
    the group page for an admin); an instructor's limits on their group are ``GroupLimit``s, which only tighten."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                                related_name="quota")
    group = models.OneToOneField("auth.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="quota")
    priority = models.IntegerField(_("priority"), null=True, blank=True,
                                   help_text=_("Added to the priority of every job of the user or group."))

    class Meta:
        verbose_name = _("quota")
        verbose_name_plural = _("quotas")
        constraints = [models.CheckConstraint(condition=models.Q(user__isnull=False) ^ models.Q(group__isnull=False),
                                              name="quota_for_user_xor_group")]

    def __str__(self):
        return f"quota of {self.user or self.group}"


class GroupLimit(Limits):
    """What a group's instructor sets for its members: each value can only lower what admins gave them (the smaller
    of the two wins; an empty field changes nothing), never raise it, and there is no priority to give."""

    group = models.OneToOneField("auth.Group", on_delete=models.CASCADE, related_name="instructor_limit")
    set_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        verbose_name = _("instructor's group limit")
        verbose_name_plural = _("instructors' group limits")

    def __str__(self):
        return f"limits of {self.group} set by its instructor"


class GroupInvitation(models.Model):
    """An instructor's invitation into a group: the user joins only when they accept it (an instructor of a group
    reads its members' objects, so nobody is made a member without their consent; admins add members directly)."""

    group = models.ForeignKey("auth.Group", on_delete=models.CASCADE, related_name="invitations")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="group_invitations")
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["group", "user"], name="one_invitation_per_group_and_user")]
        verbose_name = _("group invitation")
        verbose_name_plural = _("group invitations")

    def __str__(self):
        return f"{self.user} invited to {self.group}"


class UsageRecord(models.Model):
    """One run segment of a job (from its start to its pause, end or crash): who used how many devices, when."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records")
    job = models.ForeignKey("jobs.Job", null=True, on_delete=models.SET_NULL, related_name="usage_records")
    devices = models.PositiveSmallIntegerField(default=1)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(db_index=True)
    device_seconds = models.FloatField()

    class Meta:
        ordering = ["-ended_at"]

    @property
    def hours(self) -> float:
        return self.device_seconds / 3600

    @classmethod
    def close_segment(cls, job, ended_at) -> None:
        """Record the run segment of ``job`` (anything with ``owner_id``, ``gpus`` and ``started_at``) that ends at
        ``ended_at``; called by Job.transition when a job leaves a running state."""
        if job.started_at is None:
            return
        length = max((ended_at - job.started_at).total_seconds(), 0.0)
        cls.objects.create(user_id=job.owner_id, job=job, devices=job.gpus, started_at=job.started_at,
                           ended_at=ended_at, device_seconds=length * job.gpus)


class AuditEntry(models.Model):
    """Who did what to which object, when, from where."""

    time = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    username = models.CharField(max_length=150, blank=True)  # kept when the user is deleted, or for failed logins
    action = models.CharField(max_length=40, db_index=True)
    object_type = models.CharField(max_length=40, blank=True)
    object_id = models.CharField(max_length=40, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-time"]
        verbose_name = _("audit entry")
        verbose_name_plural = _("audit log")

    def __str__(self):
        return f"{self.time:%Y-%m-%d %H:%M} {self.username} {self.action} {self.object_type} {self.object_id}"
