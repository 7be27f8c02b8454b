import csv
from datetime import datetime, timedelta

from django import forms
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from jobs.models import Dataset, Job
from jobs.services import usage_summary
from minicloud.errors import ServiceError, id_or_none
from models_registry.models import ModelVersion, Tokenizer

from . import services
from .access import NotFound, readable
from .models import LIMIT_FIELDS, QUOTA_FIELDS, ApiToken, GroupLimit, Quota, UsageRecord
from .services import usage_by_day, usage_report


class GroupQuotaForm(forms.ModelForm):
    """An admin's quota for a group (its members' default)."""

    class Meta:
        model = Quota
        fields = QUOTA_FIELDS


class GroupLimitForm(forms.ModelForm):
    """An instructor's limits for their group: they only lower what admins gave its members."""

    class Meta:
        model = GroupLimit
        fields = LIMIT_FIELDS


def _quota_form(user, group, data):
    if user.is_superuser:
        return GroupQuotaForm(data, instance=Quota.objects.filter(group=group).first())
    return GroupLimitForm(data, instance=GroupLimit.objects.filter(group=group).first())


@login_required
def usage(request):
    summary = usage_summary(request.user)
    return render(request, "accounts/usage.html", {
        **summary, "by_day": usage_by_day(request.user),
        "records": UsageRecord.objects.filter(user=request.user).select_related("job")[:200]})


@staff_member_required
def usage_report_csv(request):
    """Device-hours per user over a period (?since=YYYY-MM-DD&until=YYYY-MM-DD; default the last 30 days)."""
    def day(name, default):
        try:
            return timezone.make_aware(datetime.strptime(request.GET[name], "%Y-%m-%d"))
        except (KeyError, ValueError):
            return default

    until = day("until", timezone.now())
    since = day("since", until - timedelta(days=30))
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{since:%Y%m%d}-{until:%Y%m%d}.csv"'
    writer = csv.writer(response)
    writer.writerow(["username", "groups", "jobs", "device_hours", "since", "until"])
    for row in usage_report(since, until):
        writer.writerow([row["username"], row["groups"], row["jobs"], row["device_hours"], since.isoformat(),
                         until.isoformat()])
    return response


# --- groups -------------------------------------------------------------------------------------------------------

@login_required
def group_list(request):
    if request.method == "POST" and request.POST.get("action") in ("accept", "decline"):
        try:
            joined = services.answer_invitation(request.user, request.POST.get("invitation"),
                                                request.POST["action"] == "accept", request=request)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            if request.POST["action"] == "accept":
                messages.success(request, _("You joined “%(name)s”.") % {"name": joined.name})
        return redirect("groups")
    if request.method == "POST":
        try:
            group = services.create_group(request.user, request.POST.get("name", ""),
                                          request.POST.get("description", ""), request=request)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, _("Group “%(name)s” created.") % {"name": group.name})
            return redirect("group_detail", group_id=group.pk)
    return render(request, "accounts/groups.html", {
        "groups": services.groups_of(request.user), "role": services.role_of(request.user),
        "invitations": services.invitations_of(request.user)})


@login_required
def group_detail(request, group_id):
    group = services.groups_of(request.user).filter(pk=group_id).first()
    if group is None:
        raise Http404(_("No such group."))
    manages = services.manages_group(request.user, group)
    form = _quota_form(request.user, group, request.POST or None) if manages else None
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "add":
                member, joined = services.add_member(request.user, group, request.POST.get("username", ""),
                                                     request=request)
                if not joined:
                    messages.success(request, _("%(username)s is invited: they join when they accept.")
                                     % {"username": member.username})
            elif action == "remove":
                member = group.user_set.filter(pk=id_or_none(request.POST.get("user"))).first()
                if member:
                    services.remove_member(request.user, group, member, request=request)
            elif action == "quota" and form is not None and form.is_valid():
                services.set_group_quota(request.user, group, form.cleaned_data, request=request)
                messages.success(request, _("The group's quota is saved."))
            elif action == "quota" and form is not None:
                return render(request, "accounts/group_detail.html", _group_context(request, group, manages, form))
            else:
                raise Http404(_("No such action."))
        except ServiceError as exc:
            messages.error(request, str(exc))
        return redirect("group_detail", group_id=group.pk)
    return render(request, "accounts/group_detail.html", _group_context(request, group, manages, form))


def _group_context(request, group, manages, form):
    members = group.user_set.order_by("username")
    return {"group": group, "manages": manages, "members": members, "form": form,
            "invited": group.invitations.select_related("user") if manages else [],
            "instructors": services.group_instructors(group),
            "jobs": Job.objects.visible_to(request.user).filter(owner__in=members).select_related("owner")[:100]}


# --- sharing ------------------------------------------------------------------------------------------------------

def shared_object(user, kind: str, pk):
    """The object a share URL names (its kind: job, dataset, model or tokenizer) if ``user`` may read it; NotFound
    otherwise (the page and the API alike)."""
    model = {"job": Job, "dataset": Dataset, "model": ModelVersion, "tokenizer": Tokenizer}.get(kind)
    if model is None:
        raise NotFound(_("Not found."))
    return readable(model, user, pk)


@login_required
@require_POST
def share(request, kind, pk):
    obj = shared_object(request.user, kind, pk)
    choice = request.POST.get("visibility", "")
    group = None
    if choice.startswith("group:"):
        group = services.groups_of(request.user).filter(pk=choice.removeprefix("group:") or 0).first()
        choice = "group"
    try:
        services.set_visibility(request.user, obj, choice, group, request=request)
        messages.success(request, _("Visibility saved."))
    except ServiceError as exc:
        if exc.status == 403:
            raise PermissionDenied(str(exc)) from None
        messages.error(request, str(exc))
    target = request.POST.get("next") or "/"
    if not target.startswith("/") or not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = "/"
    return HttpResponseRedirect(target)  # not redirect(): it would take "abc" for a view's name


# --- API tokens ---------------------------------------------------------------------------------------------------

@login_required
def tokens(request):
    """The user's API tokens: create one (shown once), see when each was last used, revoke."""
    new_token = None
    if request.method == "POST":
        if request.POST.get("action") == "revoke":
            token = ApiToken.objects.filter(user=request.user, pk=id_or_none(request.POST.get("token"))).first()
            if token:
                services.audit(request.user, "token_revoke", token, request=request, name=token.name)
                token.delete()
                messages.success(request, _("Token revoked."))
            return redirect("tokens")
        name = (request.POST.get("name") or "").strip()[:100] or "api"
        token, new_token = ApiToken.issue(request.user, name)
        services.audit(request.user, "token_create", token, request=request, name=name)
    return render(request, "accounts/tokens.html", {
        "tokens": ApiToken.objects.filter(user=request.user).order_by("-created_at"), "new_token": new_token})
