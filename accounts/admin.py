from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group

from django.template.response import TemplateResponse
from django.urls import path
from django.utils.translation import gettext_lazy as _

from minicloud.errors import ServiceError

from .forms import UsersImportForm
from .models import ApiToken, AuditEntry, GroupInfo, GroupInvitation, GroupLimit, Profile, Quota, UsageRecord
from .services import audit, bulk_create_users, read_users_csv


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


class ProfileInline(admin.StackedInline):
    model = Profile
    can_delete = False
    extra = 0
    max_num = 1


@admin.register(User)
class MiniCloudUserAdmin(AuditedQuotaMixin, UserAdmin):
    inlines = [ProfileInline, QuotaInline]
    list_filter = UserAdmin.list_filter + ("groups__name", "profile__role")
    actions = ["deactivate"]
    change_list_template = "admin/accounts/user_change_list.html"

    def get_urls(self):
        extra = [path("import/", self.admin_site.admin_view(self.import_csv), name="accounts_user_import")]
        return extra + super().get_urls()

    def import_csv(self, request):
        """Bulk-create users from a CSV; the generated passwords are shown once on the result page."""
        form = UsersImportForm(request.POST or None, request.FILES or None)
        created = None
        if request.method == "POST" and form.is_valid():
            try:
                text = form.cleaned_data["file"].read().decode("utf-8-sig")
                created = bulk_create_users(read_users_csv(text), actor=request.user, request=request)
            except (UnicodeDecodeError, ServiceError) as exc:
                form.add_error("file", str(exc))
        context = {**self.admin_site.each_context(request), "form": form, "created": created,
                   "title": _("Import users from CSV"), "opts": self.model._meta}
        return TemplateResponse(request, "admin/accounts/user_import.html", context)

    @admin.action(description=_("Deactivate the selected users"))
    def deactivate(self, request, queryset):
        for user in queryset.exclude(pk=request.user.pk):
            user.is_active = False
            user.save(update_fields=["is_active"])
            audit(request.user, "deactivate", user, request=request)


class GroupInfoInline(admin.StackedInline):
    model = GroupInfo
    can_delete = False
    extra = 0
    max_num = 1
    filter_horizontal = ("instructors",)


@admin.register(Group)
class MiniCloudGroupAdmin(AuditedQuotaMixin, GroupAdmin):
    inlines = [GroupInfoInline, QuotaInline]


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    """Bulk quota changes: edit the limits of many users and groups at once in the list."""

    list_display = ("__str__", "max_running_jobs", "max_queued_jobs", "max_gpus_per_job", "device_hours_per_week",
                    "max_job_hours", "storage_gb", "priority")
    list_editable = ("max_running_jobs", "max_queued_jobs", "max_gpus_per_job", "device_hours_per_week",
                     "max_job_hours", "storage_gb", "priority")
    list_filter = ("group",)
    search_fields = ("user__username", "group__name")

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        audit(request.user, "quota_change", obj, request=request,
              fields={k: form.cleaned_data.get(k) for k in form.changed_data if k not in ("user", "group")})


@admin.register(GroupLimit)
class GroupLimitAdmin(admin.ModelAdmin):
    """What instructors set for their groups (they only lower the admins' quotas)."""

    list_display = ("group", "set_by", "max_running_jobs", "max_queued_jobs", "max_gpus_per_job",
                    "device_hours_per_week", "max_job_hours", "storage_gb")
    search_fields = ("group__name",)


@admin.register(GroupInvitation)
class GroupInvitationAdmin(admin.ModelAdmin):
    list_display = ("group", "user", "invited_by", "created_at")
    search_fields = ("group__name", "user__username")


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
