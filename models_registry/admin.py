from django.contrib import admin

from .models import ModelVersion, Tokenizer


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "stage", "parameters", "is_public", "created_at")
    list_filter = ("stage", "is_public")
    search_fields = ("name", "owner__username")
    raw_id_fields = ("job", "parent", "dataset")


@admin.register(Tokenizer)
class TokenizerAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "vocab_size", "is_public", "created_at")
