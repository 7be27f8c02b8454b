from django.contrib import admin

from .models import Dataset, Integrations, Job, JobEvent, JobTemplate, Node, Notification


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    fields = readonly_fields = ("time", "kind", "actor", "text")  # the note in the admin's language


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "stage", "status", "node", "step", "total_steps", "created_at")
    list_filter = ("status", "stage", "node")
    search_fields = ("name", "owner__username")
    raw_id_fields = ("dataset", "base_model", "output_model", "tokenizer")
    inlines = [JobEventInline]


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "owner", "records", "is_public", "created_at")
    list_filter = ("kind", "is_public")


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "started_at", "heartbeat_at", "stopping")


@admin.register(JobTemplate)
class JobTemplateAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "created_at")
    search_fields = ("name", "owner__username")


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    """What was told to whom, and what failed: an operator's view of e-mail and webhook deliveries."""

    list_display = ("job", "event", "channel", "target", "status", "attempts", "next_attempt_at", "sent_at")
    list_filter = ("status", "channel", "event")
    readonly_fields = ("job", "event", "channel", "target", "payload", "attempts", "last_error", "created_at",
                       "sent_at")


@admin.register(Integrations)
class IntegrationsAdmin(admin.ModelAdmin):
    """Users' notification settings; their keys and secrets stay out of the admin (encrypted, write-only)."""

    list_display = ("user", "email_enabled", "webhook_url", "wait_minutes")
    exclude = ("webhook_secret", "wandb_key", "swanlab_key")
