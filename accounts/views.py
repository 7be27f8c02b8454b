import csv
from datetime import datetime, timedelta

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render
from django.utils import timezone

from .models import UsageRecord
from .services import usage_by_day, usage_report, usage_summary


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
