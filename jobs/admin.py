from django.contrib import admin

from .models import Dataset, Job, JobEvent, JobTemplate, Node


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
