"""OpenAI-compatible endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streaming with SSE).

The official ``openai`` client and chat front ends work against them with a MiniCloud API token as the API key.
Thinking (MiniMind's ``<think>`` block) is asked for with ``enable_thinking`` or ``chat_template_kwargs``; its text
comes back as ``reasoning_content``. The pages' playground calls the same endpoint with its session (and CSRF token).
"""
from __future__ import annotations

import json
import time
import uuid

from asgiref.sync import sync_to_async
from django.http import JsonResponse, StreamingHttpResponse
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt

from minicloud.api import json_body, request_user
from minicloud.errors import ServiceError, id_or_none, int_or_none

from .inference import model_entry, worker
from .models import ModelVersion

MAX_TOKENS = 4096


RETRY_AFTER_S = 5  # a refused chat (429): OpenAI's clients wait this long, then try again


def oai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
              code: str | None = None):
    resp = JsonResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)
    if status == 429:
        resp["Retry-After"] = str(RETRY_AFTER_S)
    return resp


def model_id(mv: ModelVersion) -> str:
    return f"{mv.name}:v{mv.version}"


def find_model(user, ref) -> ModelVersion:
    """A model the user may read, by id (``12``), ``name:vN`` or name (its newest version, the user's own first)."""
    qs = ModelVersion.objects.visible_to(user).language_models().select_related("tokenizer")
    ref = str(ref or "").strip()
    if not ref:
        raise ServiceError(_("model: required (an id or name from GET /v1/models)"), field="model")
    found = qs.filter(pk=id_or_none(ref)).first()
    name, _sep, version = ref.rpartition(":v")
    if found is None and (version := id_or_none(version)):
        found = qs.filter(name=name, version=version).order_by("-created_at").first()
    if found is None:
        candidates = list(qs.filter(name=ref).order_by("-version", "-created_at"))
        found = next((m for m in candidates if m.owner_id == user.pk), candidates[0] if candidates else None)
    if found is None:
        raise ServiceError(
            _("model: no model %(ref)s that you can use") % {"ref": repr(ref)}, status=404, field="model"
        )
    return found


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if content is None:
        return ""
    raise ServiceError(_("messages: content must be a string or a list of text parts"), field="messages")


def _number(body, name, default, low, high):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ServiceError(
            _("%(name)s: a number from %(low)s to %(high)s") % {"name": name, "low": low, "high": high}, field=name
        )
    return value


def parse_request(body: dict) -> dict:
    """The worker request for an OpenAI chat body (validated; errors name the parameter)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServiceError(_("messages: a non-empty list of {role, content}"), field="messages")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ServiceError(
                _("messages[%(i)s]: role must be system, user, assistant or tool") % {"i": i}, field="messages"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": _text(m.get("content"))}
        if m.get("reasoning_content"):
            msg["reasoning_content"] = _text(m["reasoning_content"])
        msgs.append(msg)
    kwargs = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), dict) else {}
    thinking = body.get("enable_thinking", kwargs.get("enable_thinking", kwargs.get("open_thinking")))
    if thinking is None and body.get("reasoning_effort") not in (None, "none"):
        thinking = True
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 512
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ServiceError(_("max_tokens: an integer from 1 to %(max)s") % {"max": MAX_TOKENS}, field="max_tokens")
    if body.get("n", 1) != 1:
        raise ServiceError(_("n: only 1 is supported"), field="n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise ServiceError(_("seed: an integer from -2^63 to 2^64 - 1"), field="seed")  # torch's range
    return {"messages": msgs, "max_new_tokens": max_tokens, "thinking": bool(thinking), "seed": seed,
            "temperature": _number(body, "temperature", 0.85, 0, 2), "top_p": _number(body, "top_p", 0.85, 0.01, 1),
            **_logit_bias(body.get("logit_bias"))}


MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's bound)


def _logit_bias(bias) -> dict:
    """OpenAI's ``logit_bias``: token ids (as text, JSON's keys) to a number from -100 (never chosen) to 100 (always),
    added to the model's logits before sampling; ``{}`` when not given."""
    if bias is None:
        return {}
    pairs = [(int_or_none(k), v) for k, v in bias.items()] if isinstance(bias, dict) else None
    if pairs is None or len(pairs) > MAX_LOGIT_BIAS or any(
            t is None or t < 0 or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100
            for t, v in pairs):
        raise ServiceError(_("logit_bias: at most %(n)s token ids, each with a number from -100 to 100")
                           % {"n": MAX_LOGIT_BIAS}, field="logit_bias")
    return {"logit_bias": {str(t): float(v) for t, v in pairs}} if pairs else {}


def _prepare(request):
    """(user, model version, worker request, stream?) — synchronous: it reads the database."""
    user = request_user(request)
    if user is None:
        raise ServiceError(_("authentication required: send 'Authorization: Bearer <token>'"), status=401)
    body = json_body(request)
    req = parse_request(body)
    mv = find_model(user, body.get("model"))
    vocab = int(mv.config.get("vocab_size") or 6400)
    if outside := [t for t in req.get("logit_bias", {}) if int(t) >= vocab]:
        raise ServiceError(_("logit_bias: token %(id)s is not in the model's vocabulary (0 to %(last)s)")
                           % {"id": outside[0], "last": vocab - 1}, field="logit_bias")
    req["model"] = model_entry(mv)
    return user, mv, req, bool(body.get("stream"))


def _error_response(exc: ServiceError):
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "requests"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
    return oai_error(exc.status, str(exc), exc.field, kind, "rate_limit_exceeded" if exc.status == 429 else None)


def _chunk(cid, created, name, delta, finish=None, usage=None) -> str:
    data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _after(first: dict, gen):
    """``first``, then the rest of ``gen`` (closed with it)."""
    try:
        yield first
        async for msg in gen:
            yield msg
    finally:
        await gen.aclose()


@csrf_exempt
async def chat_completions(request):
    if request.method != "POST":
        return oai_error(405, "use POST")
    try:
        user, mv, req, stream = await sync_to_async(_prepare)(request)
        gen = worker().stream(req, user.pk)
        first = await anext(gen)  # the worker has the request (its place in the turns), or refused it (429)
    except ServiceError as exc:
        return _error_response(exc)
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id(mv)
    gen = _after(first, gen)
    if not stream:
        content, reasoning, done = [], [], {}
        try:
            async for msg in gen:
                content.append(msg.get("content", ""))
                reasoning.append(msg.get("reasoning", ""))
                done = msg if msg.get("done") else done
        except ServiceError as exc:
            return _error_response(exc)
        message = {"role": "assistant", "content": "".join(content)}
        if req["thinking"]:
            message["reasoning_content"] = "".join(reasoning)
        return JsonResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                             "choices": [{"index": 0, "message": message,
                                          "finish_reason": _finish_reason(done.get("finish_reason", "stop"))}],
                             "usage": done.get("usage", {})}, json_dumps_params={"ensure_ascii": False})

    async def events():
        yield _chunk(cid, created, name, {"role": "assistant", "content": ""})
        try:
            async for msg in gen:
                if msg.get("queued"):  # an SSE comment: OpenAI's clients skip it, the playground shows it
                    yield f": queued {msg['queued']}\n\n"
                if msg.get("reasoning"):
                    yield _chunk(cid, created, name, {"reasoning_content": msg["reasoning"]})
                if msg.get("content"):
                    yield _chunk(cid, created, name, {"content": msg["content"]})
                if msg.get("done"):
                    yield _chunk(cid, created, name, {}, _finish_reason(msg["finish_reason"]), msg.get("usage"))
        except ServiceError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        finally:
            await gen.aclose()
        yield "data: [DONE]\n\n"

    resp = StreamingHttpResponse(events(), content_type="text/event-stream")
    resp["Cache-Control"] = "no-cache"
    resp["X-Accel-Buffering"] = "no"  # nginx: pass tokens on at once
    return resp


def _list_models(request):
    user = request_user(request)
    if user is None:
        raise ServiceError(_("authentication required: send 'Authorization: Bearer <token>'"), status=401)
    models = ModelVersion.objects.visible_to(user).language_models().select_related("owner").order_by(
        "-created_at")[:500]
    return {"object": "list", "data": [{"id": model_id(m), "object": "model", "created": int(m.created_at.timestamp()),
                                        "owned_by": m.owner.username if m.owner else "minicloud",
                                        "minicloud_id": m.pk, "stage": m.stage} for m in models]}


@csrf_exempt
async def models(request):
    if request.method != "GET":
        return oai_error(405, "use GET")
    try:
        return JsonResponse(await sync_to_async(_list_models)(request))
    except ServiceError as exc:
        return _error_response(exc)
