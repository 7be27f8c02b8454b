from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _, gettext_lazy, pgettext
from django.views.decorators.http import require_POST

from accounts.access import may_manage, readable
from accounts.services import share_context
from jobs.models import Dataset
from minicloud.errors import ServiceError, id_or_none, int_or_none

from . import inference, services
from .api import download
from .models import Evaluation, ModelVersion, Tokenizer


def _model_or_404(request, model_id):
    return readable(ModelVersion, request.user, model_id, "tokenizer", "job", "parent", "dataset")


@login_required
def model_list(request):
    models = ModelVersion.objects.visible_to(request.user).select_related("owner", "job")
    tag = request.GET.get("tag", "").strip()
    if tag:
        models = [m for m in models if tag in m.tags]
    return render(request, "models_registry/list.html", {"models": models, "tag": tag})


FORMAT_LABELS = {"pth": gettext_lazy("MiniMind .pth (fp16)"), "hf": gettext_lazy("Hugging Face (safetensors, zip)"),
                 "hf4": gettext_lazy("Hugging Face, transformers 4.57 layout (one module per expert, zip)"),
                 "gguf-f16": gettext_lazy("GGUF f16 for llama.cpp / Ollama (with Modelfile, zip)"),
                 "gguf-bf16": gettext_lazy("GGUF bf16 (with Modelfile, zip)"),
                 "gguf-q8_0": gettext_lazy("GGUF Q8_0, 8-bit (with Modelfile, zip)"),
                 "gguf-q4_k_m": gettext_lazy("GGUF Q4_K_M, 4-bit (with Modelfile, zip)"),
                 "lora": gettext_lazy("LoRA (MiniMind .pth + peft adapter, zip)")}


@login_required
def model_detail(request, model_id):
    mv = _model_or_404(request, model_id)
    can_manage = may_manage(request.user, mv)
    formats = [{**row, "label": FORMAT_LABELS[row["key"]]} for row in services.download_choices(mv)]
    lineage = services.lineage(mv, request.user)
    # This version's evaluations beside those of its ancestors and descendants: before/after each stage.
    family = [a.pk for a in lineage["ancestors"] if a] + [mv.pk] + _descendant_ids(lineage["descendants"])
    return render(request, "models_registry/detail.html", {
        "model": mv, "formats": formats, "merge_check": mv.verifications.get("merge"), "can_manage": can_manage,
        "lineage": lineage, "thumbnail": services.loss_thumbnail(mv), "metrics": sorted(mv.metrics.items()),
        "evaluations": services.evaluation_table(Evaluation.objects.visible_to(request.user).filter(
            model__in=family).select_related(
            "model", "dataset")), "datasets": Dataset.objects.visible_to(request.user),
        **share_context(request.user, mv)})


def _descendant_ids(nodes) -> list[int]:
    return [i for n in nodes for i in [n["model"].pk] + _descendant_ids(n["children"])]


@login_required
def evaluations(request):
    """Every evaluation you can see, comparable across versions (optionally of one dataset)."""
    qs = Evaluation.objects.visible_to(request.user).select_related("model", "dataset").order_by(
        "dataset_id", "model__name", "model__version")
    ds = id_or_none(request.GET.get("dataset"))
    if ds:
        qs = qs.filter(dataset_id=ds)
    return render(request, "models_registry/evaluations.html", {
        "table": services.evaluation_table(qs[:1000]), "datasets": Dataset.objects.visible_to(request.user),
        "dataset": ds})


@login_required
@require_POST
def model_action(request, model_id, action):
    mv = _model_or_404(request, model_id)
    try:
        if action == "edit":
            services.update_model(request.user, mv, notes=request.POST.get("notes", ""),
                                  tags=request.POST.get("tags", ""))
            messages.success(request, _("Saved."))
        elif action == "merge":
            merged = services.merge_lora(owner=request.user, mv=mv, request=request)
            messages.success(request, _("LoRA merged into a new full model."))
            return redirect("model_detail", model_id=merged.pk)
        elif action == "evaluate":
            ds = Dataset.objects.visible_to(request.user).filter(pk=id_or_none(request.POST.get("dataset"))).first()
            if ds is None:
                raise ServiceError(_("dataset: choose one"), field="dataset")
            config = {k: int_or_none(request.POST[k]) for k in ("eval_records", "accuracy_tasks")
                      if int_or_none(request.POST.get(k)) is not None}
            job = services.start_evaluation(owner=request.user, mv=mv, dataset=ds, config=config)
            messages.success(request, _("Evaluation queued."))
            return redirect("job_detail", job_id=job.pk)
        elif action == "delete":
            services.delete_model(request.user, mv, request=request)
            messages.success(request, _("Model deleted."))
            return redirect("models")
        else:
            raise Http404(_("No such action."))
    except ServiceError as exc:
        messages.error(request, str(exc))
    return redirect("model_detail", model_id=mv.pk)


@login_required
def model_download(request, model_id):
    mv = _model_or_404(request, model_id)
    try:
        return download(request, mv)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("model_detail", model_id=mv.pk)


@login_required
def model_import(request):
    """Import a MiniMind .pth (with its config) or a zipped Hugging Face folder."""
    if request.method == "POST":
        tok = request.POST.get("tokenizer", "")
        try:
            mv = services.import_model(owner=request.user, name=request.POST.get("name", ""),
                                       upload=request.FILES.get("file"), config=request.POST.get("config", ""),
                                       tokenizer_json=request.FILES.get("tokenizer_json"),
                                       tokenizer_config=request.FILES.get("tokenizer_config"),
                                       tokenizer_id=id_or_none(tok), request=request)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, _("Model imported."))
            return redirect("model_detail", model_id=mv.pk)
    return render(request, "models_registry/import.html", {
        "tokenizers": Tokenizer.objects.visible_to(request.user).filter(status="ready"), "form": request.POST})


@login_required
def playground(request):
    """Chat with one model, or two side by side, through /v1/chat/completions (streamed)."""
    models = list(ModelVersion.objects.visible_to(request.user).language_models().select_related(
        "owner", "tokenizer").order_by("-created_at"))
    first = id_or_none(request.GET.get("model", ""))
    chosen = next((m for m in models if m.pk == first), models[0] if models else None)
    if chosen is not None:  # the model preselected: its load begins now, while its user types
        inference.warm(chosen)
    words = {"reasoning": _("Reasoning"), "you": _("You"), "error": _("Error"),
             "empty": _("(no text: the model ended at once or wrote only blank lines)"),
             "tokens": pgettext("after a number", "tokens"),
             # while other users' chats take their turns at the generation worker (models_registry/inference.py)
             "waiting": _("Waiting for its turn: %(n)s ahead")}  # for playground.js, in the page's language
    return render(request, "models_registry/playground.html", {
        "models": models, "first": first, "words": words})


@login_required
def tokenizer_list(request):
    """Tokenizers: list, upload (tokenizer.json + tokenizer_config.json) and train on a dataset."""
    from django.contrib import messages
    from django.shortcuts import redirect



    if request.method == "POST":
        try:
            if request.POST.get("action") == "train":
                ds = Dataset.objects.visible_to(request.user).filter(pk=id_or_none(request.POST.get("dataset"))).first()
                if ds is None:
                    raise ServiceError(_("dataset: choose one"), field="dataset")
                vocab = request.POST.get("vocab_size", "6400")
                tok = services.start_tokenizer_training(owner=request.user, name=request.POST.get("name", ""),
                                                        dataset=ds, vocab_size=int_or_none(vocab) or 0,
                                                        request=request)
            else:
                tok = services.upload_tokenizer(owner=request.user, name=request.POST.get("name", ""),
                                                tokenizer_json=request.FILES.get("tokenizer_json"),
                                                tokenizer_config=request.FILES.get("tokenizer_config"),
                                                request=request)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            return redirect("tokenizer_detail", tokenizer_id=tok.pk)
    return render(request, "models_registry/tokenizers.html", {
        "tokenizers": Tokenizer.objects.visible_to(request.user).select_related("owner"),
        "datasets": Dataset.objects.visible_to(request.user)})


@login_required
def tokenizer_detail(request, tokenizer_id):
    tok = readable(Tokenizer, request.user, tokenizer_id)
    manage = may_manage(request.user, tok) and tok.owner_id is not None
    return render(request, "models_registry/tokenizer_detail.html", {
        "tokenizer": tok, "can_delete": manage, **share_context(request.user, tok),
        "references": services.tokenizer_references(tok) if manage else []})


@login_required
@require_POST
def tokenizer_delete(request, tokenizer_id):
    tok = readable(Tokenizer, request.user, tokenizer_id)
    try:
        services.delete_tokenizer(request.user, tok, request=request)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("tokenizer_detail", tokenizer_id=tok.pk)
    messages.success(request, _("Tokenizer deleted."))
    return redirect("tokenizers")
