from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group

from .models import ApiToken, AuditEntry, Quota, UsageRecord
from .services import audit


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "name", "prefix", "created_at", "last_used_at")
    readonly_fields = ("digest", "prefix", "created_at", "last_used_at")
    search_fields = ("user__username", "name")


class QuotaInline(admin.StackedInline):
    model = Quota
    can_delete = True
    extra = 0
    max_num = 1


class AuditedQuotaMixin:
    """Quota changes made in the admin are audited."""

    def save_formset(self, request, form, formset, change):
        super().save_formset(request, form, formset, change)
        if formset.model is Quota:
            for f in formset.forms:
                if f.instance.pk and f.has_changed():
                    audit(request.user, "quota_change", f.instance, request=request,
                          fields={k: f.cleaned_data.get(k) for k in f.changed_data if k not in ("user", "group")})


User = get_user_model()
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class MiniCloudUserAdmin(AuditedQuotaMixin, UserAdmin):
    inlines = [QuotaInline]
    list_filter = UserAdmin.list_filter + ("groups__name",)


@admin.register(Group)
class MiniCloudGroupAdmin(AuditedQuotaMixin, GroupAdmin):
    inlines = [QuotaInline]


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ("__str__", "max_running_jobs", "max_queued_jobs", "max_gpus_per_job", "device_hours_per_week",
                    "max_job_hours", "storage_gb", "priority")
    search_fields = ("user__username", "group__name")
    actions = ["double_device_hours"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        audit(request.user, "quota_change", obj, request=request,
              fields={k: form.cleaned_data.get(k) for k in form.changed_data if k not in ("user", "group")})

    @admin.action(description="Double the weekly device-hours of the selected quotas")
    def double_device_hours(self, request, queryset):
        for quota in queryset.exclude(device_hours_per_week=None):
            quota.device_hours_per_week *= 2
            quota.save(update_fields=["device_hours_per_week"])
            audit(request.user, "quota_change", quota, request=request,
                  fields={"device_hours_per_week": quota.device_hours_per_week})


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ("user", "job", "devices", "started_at", "ended_at", "device_seconds")
    list_filter = ("ended_at",)
    search_fields = ("user__username",)
    raw_id_fields = ("job",)


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("time", "username", "action", "object_type", "object_id", "ip")
    list_filter = ("action", "object_type", "time")
    search_fields = ("username", "object_id", "ip")
    readonly_fields = [f.name for f in AuditEntry._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
