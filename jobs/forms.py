from django import forms
from django.utils.translation import gettext_lazy as _

from models_registry.models import ModelVersion

from .models import STAGE_CHOICES, Dataset

# Architecture presets: a tiny model that learns the demo data on a CPU in a minute, and MiniMind-3 (64M).
PRESETS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "minimind3": {"hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4},
}
PRESET_CHOICES = [("tiny", _("Tiny CPU model (hidden 64, 2 layers)")), ("minimind3", _("MiniMind-3 64M")),
                  ("custom", _("Custom"))]
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "epochs",
                 "batch_size", "learning_rate", "accumulation_steps", "max_seq_len", "max_steps", "log_interval",
                 "save_interval")
# What the form starts with: the tiny preset and settings that finish on a laptop CPU in about a minute.
QUICK_START = {**PRESETS["tiny"], "epochs": 1, "batch_size": 16, "learning_rate": 3e-3, "accumulation_steps": 1,
               "max_seq_len": 64, "max_steps": 200, "log_interval": 5, "save_interval": 100}


class JobForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=200)
    stage = forms.ChoiceField(label=_("Stage"), choices=STAGE_CHOICES)
    dataset = forms.ModelChoiceField(label=_("Dataset"), queryset=Dataset.objects.none())
    base_model = forms.ModelChoiceField(label=_("Base model (empty: train from scratch)"), required=False,
                                        queryset=ModelVersion.objects.none())
    teacher_model = forms.ModelChoiceField(label=_("Teacher model (distillation only)"), required=False,
                                           queryset=ModelVersion.objects.none())
    preset = forms.ChoiceField(label=_("Model size"), choices=PRESET_CHOICES, initial="tiny", required=False)
    hidden_size = forms.IntegerField(label=_("Hidden size"), min_value=8)
    num_hidden_layers = forms.IntegerField(label=_("Layers"), min_value=1)
    num_attention_heads = forms.IntegerField(label=_("Attention heads"), min_value=1)
    num_key_value_heads = forms.IntegerField(label=_("Key/value heads"), min_value=1)
    epochs = forms.IntegerField(label=_("Epochs"), min_value=1)
    batch_size = forms.IntegerField(label=_("Batch size"), min_value=1)
    learning_rate = forms.FloatField(label=_("Learning rate"), min_value=1e-12)
    accumulation_steps = forms.IntegerField(label=_("Gradient accumulation steps"), min_value=1)
    max_seq_len = forms.IntegerField(label=_("Max sequence length"), min_value=8)
    max_steps = forms.IntegerField(label=_("Max optimizer steps (empty: all epochs)"), min_value=1, required=False)
    log_interval = forms.IntegerField(label=_("Log every N steps"), min_value=1)
    save_interval = forms.IntegerField(label=_("Checkpoint every N steps"), min_value=1)

    def __init__(self, *args, user=None, **kwargs):
        kwargs.setdefault("initial", {**QUICK_START, "stage": "pretrain"})
        super().__init__(*args, **kwargs)
        self.fields["dataset"].queryset = Dataset.objects.visible_to(user)
        self.fields["base_model"].queryset = ModelVersion.objects.visible_to(user)
        self.fields["teacher_model"].queryset = ModelVersion.objects.visible_to(user)
        demo = self.fields["dataset"].queryset.filter(name="demo-pretrain").first()
        if demo and "dataset" not in self.initial:
            self.initial["dataset"] = demo.pk

    def job_config(self) -> dict:
        return {k: self.cleaned_data[k] for k in CONFIG_FIELDS if self.cleaned_data.get(k) is not None}

    def job_request(self, owner) -> dict:
        """The arguments of ``services.submit_job`` / ``estimate_job``."""
        d = self.cleaned_data
        return dict(owner=owner, name=d["name"], stage=d["stage"], dataset=d["dataset"], base_model=d["base_model"],
                    teacher_model=d["teacher_model"], config=self.job_config())
