from django.http import FileResponse

from accounts.services import audit
from minicloud.api import ApiError, endpoint

from .models import ModelVersion
from .services import download_name, lora_zip


def _model(request, model_id) -> ModelVersion:
    mv = ModelVersion.objects.visible_to(request.user).filter(pk=model_id).first()
    if mv is None:
        raise ApiError(404, f"no model {model_id}")
    return mv


@endpoint("GET")
def models(request):
    return {"models": [m.to_dict() for m in ModelVersion.objects.visible_to(request.user)[:500]]}


@endpoint("GET")
def model_detail(request, model_id):
    return _model(request, model_id).to_dict()


@endpoint("GET")
def model_download(request, model_id):
    mv = _model(request, model_id)
    fmt = request.GET.get("format", "pth")
    if fmt == "lora":
        if not mv.lora_path:
            raise ApiError(400, f"format: model {model_id} has no LoRA adapter (only LoRA jobs make one)")
        path = lora_zip(mv)
        audit(request.user, "download", mv, request=request, format="lora")
        return FileResponse(open(path, "rb"), as_attachment=True,
                            filename=download_name(mv).replace(".pth", "_lora.zip"), content_type="application/zip")
    if fmt != "pth":
        raise ApiError(400, f"format: {fmt!r} is not available yet; use pth or lora")
    if not mv.pth_path.exists():
        raise ApiError(404, f"the weights file of model {model_id} is missing on disk")
    audit(request.user, "download", mv, request=request, format="pth")
    return FileResponse(open(mv.pth_path, "rb"), as_attachment=True, filename=download_name(mv),
                        content_type="application/octet-stream")
