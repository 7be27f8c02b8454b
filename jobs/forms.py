from django import forms
from django.utils.translation import gettext_lazy as _

from models_registry.models import ModelVersion
from training import spec as tspec

from .models import STAGE_CHOICES, Dataset

# Architecture presets: a tiny model that learns the demo data on a CPU in a minute, MiniMind-3 (64M) and its MoE
# version (198M total, 64M active).
PRESETS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "use_moe": False},
    "minimind3": {"hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "use_moe": False},
    "minimind3_moe": {"hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 8,
                      "num_key_value_heads": 4, "use_moe": True},
}
PRESET_CHOICES = [("tiny", _("Tiny CPU model (hidden 64, 2 layers)")), ("minimind3", _("MiniMind-3 64M")),
                  ("minimind3_moe", _("MiniMind-3-MoE 198M-A64M")), ("custom", _("Custom"))]
MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe")
BASIC_FIELDS = ("epochs", "batch_size", "learning_rate", "max_seq_len", "max_steps")
ADVANCED_FIELDS = ("accumulation_steps", "warmup_steps", "grad_clip", "dtype", "eval_ratio", "log_interval",
                   "save_interval", "use_compile", "compile_mode", "compile_tuning", "group_by_length")
# Keys only some stages take (shown for those stages only).
STAGE_FIELDS = {"lora": ("lora_rank", "lora_alpha"), "dpo": ("beta",), "distill": ("alpha", "temperature"),
                "grpo": ("loss_type", "num_generations", "beta", "max_gen_len", "temperature"),
                "ppo": ("max_gen_len", "temperature", "kl_coef", "clip_epsilon")}
CONFIG_FIELDS = MODEL_FIELDS + BASIC_FIELDS + ADVANCED_FIELDS
EXTRA_FIELDS = tuple(dict.fromkeys(k for keys in STAGE_FIELDS.values() for k in keys))
# Which trained models a stage starts from (the model's own stage); pretrain may continue a pretrained model.
BASE_STAGES = {"pretrain": ["pretrain"], "sft": ["pretrain", "sft"],
               "lora": ["sft", "dpo", "lora", "grpo", "ppo", "distill"],
               "dpo": ["sft", "dpo", "lora", "grpo", "ppo", "distill"],
               "grpo": ["sft", "dpo", "lora", "grpo", "ppo", "distill"],
               "ppo": ["sft", "dpo", "lora", "grpo", "ppo", "distill"],
               "distill": ["pretrain", "sft", "distill"]}
# What the form starts with: the tiny preset and settings that finish on a laptop CPU in about a minute.
QUICK_START = {**PRESETS["tiny"], "epochs": 1, "batch_size": 16, "learning_rate": 3e-3, "accumulation_steps": 1,
               "max_seq_len": 64, "max_steps": 200, "log_interval": 5, "save_interval": 100}


def stage_defaults() -> dict:
    """MiniMind's defaults of every form field, per stage (what the page fills in when the stage changes)."""
    fields = BASIC_FIELDS + ADVANCED_FIELDS + EXTRA_FIELDS
    return {stage: {k: v for k, v in tspec.resolve_config(stage, {}).items() if k in fields}
            for stage in tspec.STAGES}


def initial_from_job(job, half_batch: bool = False) -> dict:
    """The new-job form filled in as ``job`` ran (Clone: edit, then submit). ``half_batch``: half the batch size and
    twice the accumulation steps, the same effective batch in less memory (offered after an out-of-memory failure)."""
    config = {**(job.config or {}), **(job.resolved_config or {})}
    initial = {k: config[k] for k in CONFIG_FIELDS + EXTRA_FIELDS if config.get(k) is not None}
    chosen = {"eval_dataset": job.eval_dataset_id, "base_model": job.base_model_id, "teacher_model": job.teacher_model_id}
    initial.update(name=f"{job.name} (copy)", stage=job.stage, dataset=job.dataset_id, gpus=job.gpus,
                   priority=job.priority, **{k: v for k, v in chosen.items() if v is not None})
    if job.time_limit_s:
        initial["time_limit_h"] = round(job.time_limit_s / 3600, 4)
    if job.notify is not None:
        initial["notify_events"] = job.notify
    for name, opts in (job.trackers or {}).items():
        initial.update(tracker=name, tracker_project=opts.get("project", "minicloud"),
                       tracker_mode=opts.get("mode", "auto"))
    initial["preset"] = next((name for name, values in PRESETS.items()
                              if all(initial.get(k, False) == v for k, v in values.items())), "custom")
    other = {k: v for k, v in (job.config or {}).items() if k not in CONFIG_FIELDS + EXTRA_FIELDS}
    if other:  # settings the form has no field for (set through the API) travel with the clone
        initial["other_config"] = other
    if half_batch and initial.get("batch_size", 1) > 1:
        initial.update(tspec.halved_batch(job.stage, {"accumulation_steps": 1, **initial}))
    return initial


def _int(label, help_text, **kw):
    return forms.IntegerField(label=label, help_text=help_text, **kw)


def _float(label, help_text, **kw):
    return forms.FloatField(label=label, help_text=help_text, **kw)


class DatasetChoiceField(forms.ModelChoiceField):
    """Datasets with their statistics in the option text (records; tokens once computed)."""

    def label_from_instance(self, obj):
        label = f"{obj} · {obj.records} " + str(_("records"))
        if obj.stats.get("total_tokens"):
            label += f" · {obj.stats['total_tokens']:,} " + str(_("tokens"))
        return label


class JobForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=200)
    stage = forms.ChoiceField(label=_("Stage"), choices=STAGE_CHOICES)
    dataset = DatasetChoiceField(label=_("Dataset"), queryset=Dataset.objects.none())
    eval_dataset = DatasetChoiceField(label=_("Eval dataset (empty: hold out a share of the data)"),
                                          required=False, queryset=Dataset.objects.none())
    base_model = forms.ModelChoiceField(label=_("Base model (empty: train from scratch)"), required=False,
                                        queryset=ModelVersion.objects.none())
    teacher_model = forms.ModelChoiceField(label=_("Teacher model (distillation only)"), required=False,
                                           queryset=ModelVersion.objects.none())
    preset = forms.ChoiceField(label=_("Model size"), choices=PRESET_CHOICES, initial="tiny", required=False)
    hidden_size = _int(_("Hidden size"), _("Width of every layer; MiniMind-3 uses 768."), min_value=8)
    num_hidden_layers = _int(_("Layers"), _("Number of transformer blocks; MiniMind-3 uses 8."), min_value=1)
    num_attention_heads = _int(_("Attention heads"), _("Must divide the hidden size."), min_value=1)
    num_key_value_heads = _int(_("Key/value heads"), _("Grouped-query attention: must divide the attention heads."),
                               min_value=1)
    use_moe = forms.BooleanField(label=_("Mixture of experts"), required=False,
                                 help_text=_("4 experts, one active per token: more parameters, same compute."))
    epochs = _int(_("Epochs"), _("Passes over the dataset."), min_value=1)
    batch_size = _int(_("Batch size"), _("Rows per device per step; lower it if memory runs out."), min_value=1)
    learning_rate = _float(_("Learning rate"), _("Peak rate; a cosine schedule lowers it to a tenth."),
                           min_value=1e-12)
    max_seq_len = _int(_("Max sequence length"), _("Tokens per row; longer rows are cut."), min_value=8)
    max_steps = _int(_("Max optimizer steps (empty: all epochs)"), _("Stop early after this many steps."),
                     min_value=1, required=False)
    accumulation_steps = _int(_("Gradient accumulation steps"),
                              _("Batches summed before each update: a larger effective batch, same memory."),
                              min_value=1)
    warmup_steps = _int(_("Warm-up steps"), _("Linear warm-up of the learning rate (0: none, as in MiniMind)."),
                        min_value=0, required=False)
    grad_clip = _float(_("Gradient clipping"), _("Largest gradient norm; 1.0 in MiniMind."), min_value=1e-9,
                       required=False)
    dtype = forms.ChoiceField(label=_("Precision"), choices=[("bfloat16", "bfloat16"), ("float16", "float16"),
                                                             ("float32", "float32")], required=False,
                              help_text=_("Mixed precision on GPUs; the CPU always trains in float32."))
    eval_ratio = _float(_("Held-out share"), _("Share of the rows kept aside for the eval loss (0: none)."),
                        min_value=0, max_value=0.5, required=False)
    log_interval = _int(_("Log every N steps"), _("How often the charts get a point."), min_value=1)
    save_interval = _int(_("Checkpoint every N steps"), _("Pause and crash recovery resume from the last one."),
                         min_value=1)
    use_compile = forms.BooleanField(label=_("Compile the model"), required=False,
                                     help_text=_("torch.compile: about 2.4× faster on a GPU after a minute of "
                                                 "compiling."))
    compile_mode = forms.ChoiceField(label=_("Compile mode"), required=False,
                                     choices=[("default", _("Standard")),
                                              ("reduce-overhead", _("CUDA graphs (one GPU, faster)"))],
                                     help_text=_("With “Compile the model”: CUDA graphs replay each micro-step in "
                                                 "one launch (on an H100, 8 % more tokens/s for MiniMind-3 "
                                                 "pretraining). PPO, GRPO, several GPUs and the CPU use the standard "
                                                 "mode."))
    compile_tuning = forms.BooleanField(label=_("Tune compiled kernels"), required=False,
                                        help_text=_("With “Compile the model” on a GPU: the compiler also tunes "
                                                    "the kernels it generates. Minutes more compiling, then 2% more "
                                                    "tokens/s on an H100."))
    group_by_length = forms.BooleanField(label=_("Group rows by length"), required=False,
                                         help_text=_("Less padding, faster conversations; batches are less varied."))
    lora_rank = _int(_("LoRA rank"), _("Size of the low-rank adapters; 16 in MiniMind."), min_value=1,
                     required=False)
    lora_alpha = _int(_("LoRA alpha"), _("Scale of the adapters' update (alpha / rank)."), min_value=1,
                      required=False)
    beta = _float(_("Beta"), _("DPO: strength of the preference margin; GRPO: weight of the KL to the reference."),
                  min_value=0, required=False)
    alpha = _float(_("Alpha"), _("Share of the cross-entropy loss; the rest follows the teacher."), min_value=0,
                   max_value=1, required=False)
    temperature = _float(_("Temperature"), _("Distillation: softening of both distributions; RL: sampling "
                                             "temperature of the rollouts."), min_value=1e-6, required=False)
    loss_type = forms.ChoiceField(label=_("Policy loss"), choices=[("cispo", "CISPO"), ("grpo", "GRPO")],
                                  required=False, help_text=_("CISPO (MiniMind's default) or GRPO's clipped loss."))
    num_generations = _int(_("Completions per prompt"), _("Group size for the advantages; 6 in MiniMind."),
                           min_value=2, required=False)
    max_gen_len = _int(_("Max new tokens"), _("Longest completion a rollout samples."), min_value=1, required=False)
    kl_coef = _float(_("KL penalty"), _("Weight of the KL to the reference in the reward."), min_value=0,
                     required=False)
    clip_epsilon = _float(_("Clip range"), _("PPO's policy ratio clip."), min_value=1e-6, required=False)
    other_config = forms.JSONField(required=False, widget=forms.HiddenInput)  # a clone's keys without a field
    gpus = _int(_("Devices"), _("GPUs (or CPU slots) for this job; more than one trains with DDP under torchrun, "
                                "the batch size being per device."), min_value=1, required=False)
    time_limit_h = _float(_("Time limit (hours, empty: none or your quota's)"),
                          _("The job is stopped once it has run this long; retry continues from its checkpoint."),
                          min_value=0.001, required=False)
    priority = _int(_("Priority"), _("Orders your own queued jobs (higher first); only an administrator's priority "
                                     "moves a job ahead of other people's."), required=False)
    notify_events = forms.MultipleChoiceField(
        label=_("Notify me when this job"), required=False, widget=forms.CheckboxSelectMultiple,
        choices=[("succeeded", _("succeeds")), ("failed", _("fails")), ("paused_quota", _("is paused for quota")),
                 ("waiting", _("waits too long"))],
        help_text=_("By e-mail and webhook as set on the Notifications page; starts from your choice there."))
    tracker = forms.ChoiceField(label=_("Also log to"), required=False,
                                choices=[("", _("TensorBoard only")), ("wandb", "Weights & Biases"),
                                         ("swanlab", "SwanLab")],
                                help_text=_("TensorBoard event files are always written. W&B and SwanLab use your "
                                            "key (Notifications page); without network they log offline."))
    tracker_project = forms.CharField(label=_("Tracker project"), required=False, max_length=100,
                                      initial="minicloud")
    tracker_mode = forms.ChoiceField(label=_("Tracker mode"), required=False, initial="auto",
                                     choices=[("auto", _("online when possible")), ("online", _("online")),
                                              ("offline", _("offline (sync later)"))])

    def __init__(self, *args, user=None, **kwargs):
        kwargs.setdefault("initial", {**QUICK_START, **stage_defaults()["pretrain"], **QUICK_START,
                                      "stage": "pretrain", "gpus": 1, "priority": 0})
        super().__init__(*args, **kwargs)
        self.fields["dataset"].queryset = Dataset.objects.visible_to(user)
        if user is not None and "notify_events" not in self.initial:
            from .models import Integrations, default_notify_events

            prefs = Integrations.objects.filter(user=user).first()
            self.initial["notify_events"] = prefs.events if prefs else default_notify_events()
        self.fields["eval_dataset"].queryset = Dataset.objects.visible_to(user)
        self.fields["base_model"].queryset = ModelVersion.objects.visible_to(user).language_models()
        self.fields["teacher_model"].queryset = ModelVersion.objects.visible_to(user).language_models()
        demo = self.fields["dataset"].queryset.filter(name="demo-pretrain").first()
        if demo and "dataset" not in self.initial:
            self.initial["dataset"] = demo.pk

    @property
    def kept_config(self) -> str:
        """A clone's settings that have no field, as JSON text for the page ("" when there are none)."""
        text = self["other_config"].value()
        return "" if text in (None, "", "{}", "null") else text

    def clean_other_config(self):
        value = self.cleaned_data.get("other_config") or {}
        if not isinstance(value, dict):
            raise forms.ValidationError(_("Must be a JSON object."))
        return value

    def job_config(self) -> dict:
        stage = self.cleaned_data.get("stage")
        keys = CONFIG_FIELDS + STAGE_FIELDS.get(stage, ())
        out = dict(self.cleaned_data.get("other_config") or {})
        for k in keys:
            value = self.cleaned_data.get(k)
            if value is None or value == "":
                continue
            if isinstance(self.fields[k], forms.BooleanField) and k not in self.data:
                value = False
            out[k] = value
        return out

    def job_request(self, owner) -> dict:
        """The arguments of ``services.submit_job`` / ``estimate_job``."""
        d = self.cleaned_data
        hours = d.get("time_limit_h")
        trackers = ({d["tracker"]: {"project": d.get("tracker_project") or "minicloud",
                                    "mode": d.get("tracker_mode") or "auto"}} if d.get("tracker") else {})
        return dict(owner=owner, name=d["name"], stage=d["stage"], dataset=d["dataset"],
                    eval_dataset=d.get("eval_dataset"), base_model=d["base_model"], teacher_model=d["teacher_model"],
                    config=self.job_config(), gpus=d.get("gpus") or 1, priority=d.get("priority") or 0,
                    time_limit_s=max(round(hours * 3600), 1) if hours else None,
                    notify=list(d.get("notify_events") or []), trackers=trackers)


NOTIFY_CHOICES = [("succeeded", _("it succeeds")), ("failed", _("it fails")),
                  ("paused_quota", _("it is paused because the quota is used up")),
                  ("waiting", _("it waits in the queue longer than the time below"))]


class IntegrationsForm(forms.Form):
    """A user's notifications (e-mail, webhook) and experiment-tracker keys (kept encrypted; never shown again)."""

    email_enabled = forms.BooleanField(label=_("E-mail me"), required=False)
    email = forms.EmailField(label=_("E-mail address (empty: the account's)"), required=False)
    webhook_url = forms.URLField(label=_("Webhook URL (JSON, signed with HMAC-SHA256)"), required=False,
                                 max_length=500, assume_scheme="https")
    new_webhook_secret = forms.BooleanField(label=_("Make a new signing secret"), required=False)
    events = forms.MultipleChoiceField(label=_("Tell me when a job of mine"), choices=NOTIFY_CHOICES,
                                       required=False, widget=forms.CheckboxSelectMultiple)
    wait_minutes = forms.IntegerField(label=_("Waiting longer than (minutes)"), min_value=1, max_value=100_000,
                                      initial=60)
    wandb_key = forms.CharField(label=_("W&B API key (blank: keep the stored one)"), required=False,
                                max_length=200, widget=forms.PasswordInput(render_value=False))
    clear_wandb = forms.BooleanField(label=_("Forget my W&B key"), required=False)
    swanlab_key = forms.CharField(label=_("SwanLab API key (blank: keep the stored one)"), required=False,
                                  max_length=200, widget=forms.PasswordInput(render_value=False))
    clear_swanlab = forms.BooleanField(label=_("Forget my SwanLab key"), required=False)

    def update_args(self) -> dict:
        d = self.cleaned_data
        clear = tuple(k for k, flag in (("wandb_key", d["clear_wandb"]), ("swanlab_key", d["clear_swanlab"])) if flag)
        return dict(email_enabled=d["email_enabled"], email=d["email"], webhook_url=d["webhook_url"],
                    events=d["events"], wait_minutes=d["wait_minutes"], new_webhook_secret=d["new_webhook_secret"],
                    wandb_key=d["wandb_key"], swanlab_key=d["swanlab_key"], clear=clear)
