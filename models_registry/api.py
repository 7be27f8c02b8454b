from django.utils.translation import gettext as _

from accounts.access import readable
from accounts.services import audit
from jobs.models import Dataset
from minicloud.api import ApiError, endpoint, json_body, offset_page
from minicloud.downloads import serve_file
from minicloud.errors import id_or_none

from . import services
from .models import Evaluation, ModelVersion, Tokenizer
from .services import download_name


def _model(request, model_id) -> ModelVersion:
    return readable(ModelVersion, request.user, model_id, "tokenizer")


@endpoint("GET")
def models(request):
    page, next_url = offset_page(request, ModelVersion.objects.visible_to(request.user).select_related("owner"))
    return {"models": [m.to_dict() for m in page], "next": next_url}


@endpoint("GET", "PATCH", "DELETE")
def model_detail(request, model_id):
    """GET: the version with lineage and verifications. PATCH ``{"notes", "tags"}``. DELETE: when nothing uses it."""
    mv = _model(request, model_id)
    if request.method == "PATCH":
        data = json_body(request)
        return services.update_model(request.user, mv, notes=data.get("notes"), tags=data.get("tags")).to_dict()
    if request.method == "DELETE":
        services.delete_model(request.user, mv, request=request)
        return {"deleted": model_id}
    return {**mv.to_dict(), "evaluations": _evaluations(request.user, mv)}


CONTENT_TYPES = {"pth": "application/octet-stream", "hf": "application/zip", "gguf": "application/zip",
                 "lora": "application/zip"}


def download(request, mv: ModelVersion):
    """The file of ``?format=`` (pth, hf or lora), streamed and resumable; audited once per download (not per
    resumed range)."""
    fmt = request.GET.get("format", "pth")
    variant = request.GET.get("type" if fmt == "gguf" else "layout", "")
    path = services.format_file(mv, fmt, variant)
    if not request.headers.get("Range", "").startswith("bytes=") or request.headers.get("Range") == "bytes=0-":
        audit(request.user, "download", mv, request=request, format=fmt, **({"variant": variant} if variant else {}))
    return serve_file(request, path, download_name(mv, fmt, variant), CONTENT_TYPES[fmt])


@endpoint("GET")
def model_download(request, model_id):
    return download(request, _model(request, model_id))


@endpoint("POST")
def model_import(request):
    """Multipart ``name``, ``file`` (a MiniMind .pth or a zipped Hugging Face folder), for a .pth ``config`` (JSON of
    MiniMind config names), and optionally ``tokenizer_json`` + ``tokenizer_config`` or ``tokenizer`` (an id)."""
    tok = request.POST.get("tokenizer", "")
    mv = services.import_model(owner=request.user, name=request.POST.get("name", ""), upload=request.FILES.get("file"),
                               config=request.POST.get("config"), tokenizer_json=request.FILES.get("tokenizer_json"),
                               tokenizer_config=request.FILES.get("tokenizer_config"),
                               tokenizer_id=id_or_none(tok), request=request)
    return mv.to_dict(), 201


def _evaluations(user, mv) -> list[dict]:
    """The evaluations of ``mv`` that ``user`` may see (on datasets they may read)."""
    return [e.to_dict() for e in Evaluation.objects.visible_to(user).filter(model=mv).select_related("dataset")]


@endpoint("GET", "POST")
def model_evaluations(request, model_id):
    """GET: the model's evaluations. POST ``{"dataset", "config"}``: queue an evaluation job (201 with the job)."""
    mv = _model(request, model_id)
    if request.method == "GET":
        return {"evaluations": _evaluations(request.user, mv)}
    data = json_body(request)
    ds = Dataset.objects.usable_by(request.user, data.get("dataset"), "dataset", required=True)
    job = services.start_evaluation(owner=request.user, mv=mv, dataset=ds, config=data.get("config"))
    return job.to_dict(), 201


@endpoint("POST")
def model_merge(request, model_id):
    """Merge a LoRA version into its base: a new full model version."""
    return services.merge_lora(owner=request.user, mv=_model(request, model_id), request=request).to_dict(), 201


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
    data = json_body(request)
    ds = Dataset.objects.usable_by(request.user, data.get("dataset"), "dataset", required=True)
    tok = services.start_tokenizer_training(owner=request.user, name=data.get("name", ""), dataset=ds,
                                            vocab_size=data.get("vocab_size", 6400), request=request)
    return tok.to_dict(), 202


def _tokenizer(request, tokenizer_id) -> Tokenizer:
    return readable(Tokenizer, request.user, tokenizer_id)


@endpoint("GET", "DELETE")
def tokenizer_detail(request, tokenizer_id):
    """GET: the tokenizer. DELETE: when nothing uses it and it is not training."""
    tok = _tokenizer(request, tokenizer_id)
    if request.method == "DELETE":
        services.delete_tokenizer(request.user, tok, request=request)
        return {"deleted": tokenizer_id}
    return tok.to_dict()


@endpoint("POST")
def tokenizer_encode(request, tokenizer_id):
    """``{"text"}`` → ids, the text of each token, counts (the playground)."""
    text = json_body(request).get("text", "")
    if not isinstance(text, str):
        raise ApiError(400, _("text: a string"), {"field": "text"})
    return services.encode(_tokenizer(request, tokenizer_id), text)
