from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404
from django.shortcuts import render
from django.utils.translation import gettext as _

from accounts.services import audit, share_context

from .models import ModelVersion
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
