from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404
from django.shortcuts import render
from django.utils.translation import gettext as _

from accounts.services import audit, share_context

from .models import ModelVersion, Tokenizer
from .services import download_name


def _model_or_404(request, model_id):
    mv = ModelVersion.objects.visible_to(request.user).filter(pk=model_id).first()
    if mv is None:
        raise Http404(_("No such model."))
    return mv


@login_required
def model_list(request):
    return render(request, "models_registry/list.html",
                  {"models": ModelVersion.objects.visible_to(request.user).select_related("owner", "job")})


@login_required
def model_detail(request, model_id):
    mv = _model_or_404(request, model_id)
    return render(request, "models_registry/detail.html", {"model": mv, **share_context(request.user, mv)})


@login_required
def model_download(request, model_id):
    mv = _model_or_404(request, model_id)
    if not mv.pth_path.exists():
        raise Http404(_("The weights file is missing on disk."))
    audit(request.user, "download", mv, request=request, format="pth")
    return FileResponse(open(mv.pth_path, "rb"), as_attachment=True, filename=download_name(mv))


@login_required
def tokenizer_list(request):
    """Tokenizers: list, upload (tokenizer.json + tokenizer_config.json) and train on a dataset."""
    from django.contrib import messages
    from django.shortcuts import redirect

    from jobs.models import Dataset
    from minicloud.errors import ServiceError

    from . import services

    if request.method == "POST":
        try:
            if request.POST.get("action") == "train":
                ds = Dataset.objects.visible_to(request.user).filter(pk=request.POST.get("dataset") or 0).first()
                if ds is None:
                    raise ServiceError("dataset: choose one", field="dataset")
                vocab = request.POST.get("vocab_size", "6400")
                tok = services.start_tokenizer_training(owner=request.user, name=request.POST.get("name", ""),
                                                        dataset=ds, vocab_size=int(vocab) if vocab.isdigit() else 0,
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
    tok = Tokenizer.objects.visible_to(request.user).filter(pk=tokenizer_id).first()
    if tok is None:
        raise Http404(_("No such tokenizer."))
    return render(request, "models_registry/tokenizer_detail.html", {"tokenizer": tok,
                                                                     **share_context(request.user, tok)})
