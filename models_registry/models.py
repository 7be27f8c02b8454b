from pathlib import Path

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy as _, gettext_noop

from accounts.models import Shareable, VisibleQuerySet
from jobs.models import stage_label
from minicloud.files import disk_usage


# Why a training failed when the worker doing it was gone (Tokenizer.background_work).
TRAINING_LOST = gettext_noop("the worker training it stopped (its node restarted, or the process was killed): "
                             "train it again")


class Tokenizer(Shareable):
    """A tokenizer folder (tokenizer.json + tokenizer_config.json) with MiniMind's reserved ids."""

    name = models.CharField(_("name"), max_length=100)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    path = models.CharField(max_length=500)
    vocab_size = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(_("status"), max_length=20, default="ready",
                              choices=[("training", _("training")), ("ready", _("ready")), ("failed", _("failed"))])
    error = models.TextField(blank=True)
    trained_on = models.ForeignKey("jobs.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    worker = models.CharField(max_length=200, blank=True)  # "<node>:<pid>" of the worker training it, while it does
    size_bytes = models.BigIntegerField(default=0, editable=False)  # its folder, in its owner's storage (stored_bytes)

    class Meta:
        verbose_name = _("tokenizer")
        verbose_name_plural = _("tokenizers")
        ordering = ["name"]

    def __str__(self):
        return self.name

    @classmethod
    def background_work(cls):
        """Tokenizers in training, the field naming their worker, and what they become when it is gone
        (jobs.services.reconcile_background)."""
        return cls.objects.filter(status="training"), "worker", {"status": "failed", "error": TRAINING_LOST}

    @classmethod
    def home_files(cls) -> tuple[str, set | None]:
        """The folders of the tokenizers there are (minicloud/orphans.py); None while one trains: its row names its
        folder only once it is trained."""
        if cls.objects.filter(status="training").exists():
            return "tokenizers", None
        return "tokenizers", {Path(p).name for p in cls.objects.values_list("path", flat=True) if p}

    @classmethod
    def demo(cls):
        """The public demo tokenizer (installed after migrate), or None."""
        return cls.objects.filter(name="demo-tokenizer", is_public=True).first()

    @property
    def error_text(self) -> str:
        """Why it failed, in the active language where the portal wrote it (the trainer's own errors as they are)."""
        return gettext(self.error) if self.error else ""

    def to_dict(self):
        return {"id": self.pk, "name": self.name, "vocab_size": self.vocab_size, "status": self.status,
                "error": self.error_text or None, "owner": self.owner.username if self.owner else None,
                "trained_on": self.trained_on_id, "created_at": self.created_at.isoformat(), **self.sharing_dict()}


class ModelVersionQuerySet(VisibleQuerySet):
    def language_models(self):
        """Versions to train from, chat with or convert: every one but the reward models (RL's scorers)."""
        return self.exclude(source="reward")


class ModelVersion(Shareable):
    """A registered model: weights in MiniMind's .pth layout, its config, tokenizer and lineage."""

    name = models.CharField(_("name"), max_length=200)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    stage = models.CharField(_("stage"), max_length=20, blank=True)
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    dataset = models.ForeignKey("jobs.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    tokenizer = models.ForeignKey(Tokenizer, null=True, blank=True, on_delete=models.SET_NULL)
    config = models.JSONField(_("config"), default=dict)
    parameters = models.BigIntegerField(_("parameters"), default=0)
    path = models.CharField(max_length=500)
    lora_path = models.CharField(max_length=500, blank=True)  # MiniMind's LoRA .pth (LoRA jobs)
    adapter_path = models.CharField(max_length=500, blank=True)  # peft adapter folder (LoRA jobs)
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    version = models.PositiveIntegerField(_("version"), default=1)
    source = models.CharField(max_length=20, default="job")  # "job", "import" or "merge"
    active_parameters = models.BigIntegerField(_("active parameters"), default=0)
    metrics = models.JSONField(default=dict, blank=True)  # the training job's final metric values
    verifications = models.JSONField(default=dict, blank=True)  # format → {max_abs_diff, tolerance, ok, ...}
    notes = models.TextField(_("notes"), blank=True)
    tags = models.JSONField(_("tags"), default=list, blank=True)
    # Bytes in files_dir (imported or merged weights, cached conversions), measured after each write there (null:
    # never measured, walked when asked): the storage quota adds these up instead of walking every model's folder.
    files_bytes = models.BigIntegerField(null=True, blank=True, editable=False)

    objects = ModelVersionQuerySet.as_manager()

    SOURCES = ("job", "import", "merge", "reward")  # reward: a Hugging Face sequence-classification folder (RL)

    class Meta:
        verbose_name = _("model")
        verbose_name_plural = _("models")
        ordering = ["-created_at"]

    @classmethod
    def stored_bytes(cls, user) -> int:
        """Imported and merged weights and the cached conversions (Hugging Face zips) of every model; a model
        trained by a job keeps its weights in the job's run folder (counted there)."""
        total = 0
        for pk, job_id, size, files in cls.objects.filter(owner=user).order_by().values_list(
                "pk", "job_id", "size_bytes", "files_bytes"):
            used = disk_usage(cls.folder(pk)) if files is None else files
            total += max(used, size) if job_id is None else used
        return total

    @classmethod
    def home_files(cls) -> tuple[str, set]:
        """The folders of the model versions there are (minicloud/orphans.py)."""
        return "models", {str(pk) for pk in cls.objects.values_list("pk", flat=True)}

    @staticmethod
    def folder(pk) -> Path:
        """Where version ``pk``'s own files live (imports, merges, cached conversions)."""
        return settings.HOME / "models" / str(pk)

    def measure_files(self) -> int:
        """Record the bytes in ``files_dir`` after writing there (under its lock, where conversions take it)."""
        self.files_bytes = disk_usage(self.files_dir)
        ModelVersion.objects.filter(pk=self.pk).update(files_bytes=self.files_bytes)
        return self.files_bytes

    def __str__(self):
        return f"{self.name} v{self.version}"

    @property
    def stage_label(self) -> str:
        """The stage that made it, in the active language (an import has none of its own)."""
        if self.stage == "import":
            return str(_("imported"))
        if self.stage == "reward":
            return str(_("reward model"))
        return stage_label(self.stage)

    @property
    def files_dir(self) -> Path:
        """Where this version's own files live (imports, merges, cached conversions)."""
        return self.folder(self.pk)

    @property
    def pth_path(self) -> Path:
        return Path(self.path)

    @property
    def formats(self) -> list[str]:
        if self.source == "reward":
            return []  # a scorer for RL jobs (config.reward_model), not a language model to convert or chat with
        return ["pth", "hf", "gguf"] + (["lora"] if self.lora_path else [])

    @property
    def has_tokenizer(self) -> bool:
        return bool(self.tokenizer_id) and self.tokenizer.status == "ready"

    def to_dict(self):
        return {
            "id": self.pk, "name": self.name, "version": self.version, "stage": self.stage, "source": self.source,
            "owner": self.owner.username if self.owner else None, **self.sharing_dict(), "config": self.config,
            "parameters": self.parameters, "active_parameters": self.active_parameters or self.parameters,
            "size_bytes": self.size_bytes, "created_at": self.created_at.isoformat(),
            "lineage": {"parent": self.parent_id, "job": self.job_id, "dataset": self.dataset_id,
                        "tokenizer": self.tokenizer_id},
            "formats": self.formats, "verifications": self.verifications, "metrics": self.metrics,
            "notes": self.notes, "tags": self.tags,
        }


class EvaluationQuerySet(models.QuerySet):
    def visible_to(self, user):
        """The evaluations ``user`` may read: of a model they may read, on a dataset they may read (a public model's
        evaluation on someone's private dataset would show that dataset's name and figures)."""
        from jobs.models import Dataset

        return self.filter(model__in=ModelVersion.objects.visible_to(user)).filter(
            models.Q(dataset__isnull=True) | models.Q(dataset__in=Dataset.objects.visible_to(user)))


class Evaluation(models.Model):
    """What an ``eval`` job measured for a model version on a dataset (loss, perplexity, accuracies)."""

    model = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="evaluations")
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    dataset = models.ForeignKey("jobs.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    metrics = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)

    objects = EvaluationQuerySet.as_manager()

    METRICS = ("eval_loss", "perplexity", "preference_accuracy", "exact_accuracy", "contains_accuracy",
               "numeric_accuracy", "demo_accuracy")

    class Meta:
        verbose_name = _("evaluation")
        verbose_name_plural = _("evaluations")
        ordering = ["-created_at"]

    def to_dict(self):
        return {"id": self.pk, "model": self.model_id, "job": self.job_id, "dataset": self.dataset_id,
                "dataset_name": str(self.dataset) if self.dataset_id else None, "metrics": self.metrics,
                "created_at": self.created_at.isoformat()}
