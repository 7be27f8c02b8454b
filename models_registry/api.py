from django.http import FileResponse

from accounts.services import audit
from minicloud.api import ApiError, endpoint, json_body

from . import services
from .models import ModelVersion, Tokenizer
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


@endpoint("GET", "POST")
def tokenizers(request):
    """GET: the tokenizers you can use. POST (multipart ``name``, ``tokenizer_json``, ``tokenizer_config``): upload
    one, e.g. MiniMind's own."""
    if request.method == "GET":
        return {"tokenizers": [t.to_dict() for t in Tokenizer.objects.visible_to(request.user)]}
    tok = services.upload_tokenizer(owner=request.user, name=request.POST.get("name", ""),
                                    tokenizer_json=request.FILES.get("tokenizer_json"),
                                    tokenizer_config=request.FILES.get("tokenizer_config"), request=request)
    return tok.to_dict(), 201


@endpoint("POST")
def tokenizer_train(request):
    """``{"name", "dataset", "vocab_size"}``: train a tokenizer on a dataset in the background (status "training")."""
    from jobs.models import Dataset

    data = json_body(request)
    ds = Dataset.objects.visible_to(request.user).filter(pk=data.get("dataset") or 0).first()
    if ds is None:
        raise ApiError(400, "dataset: one you can read", {"field": "dataset"})
    tok = services.start_tokenizer_training(owner=request.user, name=data.get("name", ""), dataset=ds,
                                            vocab_size=data.get("vocab_size", 6400), request=request)
    return tok.to_dict(), 202


def _tokenizer(request, tokenizer_id) -> Tokenizer:
    tok = Tokenizer.objects.visible_to(request.user).filter(pk=tokenizer_id).first()
    if tok is None:
        raise ApiError(404, f"no tokenizer {tokenizer_id}")
    return tok


@endpoint("GET")
def tokenizer_detail(request, tokenizer_id):
    return _tokenizer(request, tokenizer_id).to_dict()


@endpoint("POST")
def tokenizer_encode(request, tokenizer_id):
    """``{"text"}`` → ids, the text of each token, counts (the playground)."""
    text = json_body(request).get("text", "")
    if not isinstance(text, str):
        raise ApiError(400, "text: a string", {"field": "text"})
    return services.encode(_tokenizer(request, tokenizer_id), text)
