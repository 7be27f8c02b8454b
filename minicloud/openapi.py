"""The OpenAPI 3 description of /api/v1 (served at /api/v1/openapi.json)."""
from django.http import JsonResponse

ERR = {"$ref": "#/components/responses/Error"}


def _op(summary, ok="200", auth=True, body=None, params=(), also=None):
    op = {"summary": summary, "responses": {ok: {"description": "OK"}, "400": ERR, "401": ERR, "404": ERR,
                                            **(also or {})}}
    if not auth:
        op["security"] = []
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = [{"name": p, "in": "query", "schema": {"type": "integer"}} for p in params]
    return op


ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]

SCHEMA = {
    "openapi": "3.0.3",
    "info": {"title": "MiniCloud API", "version": "1",
             "description": "Errors are {\"error\": \"field: message\", \"details\": ...}; the message is in the "
                            "language of the request's Accept-Language header (en, zh-hans), English by default."},
    "servers": [{"url": "/api/v1"}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"error": {"type": "string"}, "details": {}}}}}}},
        "schemas": {"JobCreate": {"type": "object", "required": ["name", "stage", "dataset"], "properties": {
            "name": {"type": "string"}, "stage": {"type": "string", "enum": ["pretrain", "sft", "lora", "dpo",
                                                                              "distill", "ppo", "grpo"]},
            "dataset": {"type": "integer"}, "base_model": {"type": "integer", "nullable": True},
            "eval_dataset": {"type": "integer", "nullable": True,
                             "description": "a dataset of the same kind for the eval loss (else eval_ratio)"},
            "teacher_model": {"type": "integer", "nullable": True}, "tokenizer": {"type": "integer", "nullable": True},
            "config": {"type": "object", "description": "MiniMind argument names, plus max_steps and seed"},
            "priority": {"type": "integer"}, "gpus": {"type": "integer", "minimum": 1},
            "time_limit_s": {"type": "integer", "minimum": 1, "nullable": True},
            "notify": {"type": "array", "nullable": True, "description": "events to notify of (null: your settings)",
                       "items": {"type": "string", "enum": ["succeeded", "failed", "paused_quota", "waiting"]}},
            "trackers": {"type": "object", "description": "also log to W&B / SwanLab: {\"wandb\": {\"project\": "
                         "\"p\", \"mode\": \"auto|online|offline\"}}", "properties": {
                             name: {"type": "object", "properties": {
                                 "project": {"type": "string", "maxLength": 100},
                                 "mode": {"type": "string", "enum": ["auto", "online", "offline"]}}}
                             for name in ("wandb", "swanlab")}, "additionalProperties": False}}}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/health": {"get": _op("Liveness and database check", auth=False)},
        "/auth/token": {"post": _op("Exchange username and password for a bearer token", auth=False, body={
            "type": "object", "required": ["username", "password"],
            "properties": {"username": {"type": "string"}, "password": {"type": "string"}}})},
        "/me": {"get": _op("The current user")},
        "/devices": {"get": _op("Devices of every node")},
        "/datasets": {"get": _op("Datasets you can use, by name, a page at a time (`next`: the page after, null on the "
                                 "last; limit 1-500, default 500)", params=("limit", "offset")),
                      "post": _op("Upload a dataset (multipart: file, name, kind; or upload = a finished chunked "
                                  "upload's id): validated, 400 with line-numbered errors; an upload of 32 MB or more "
                                  "is validated in the background (202: follow GET /uploads/{id})", ok="201",
                                  also={"202": {"description": "Accepted: the upload is being checked"}})},
        "/datasets/{id}": {"get": {**_op("One dataset"), "parameters": ID},
                           "delete": {**_op("Delete a dataset version nobody uses (409 lists what uses it)"),
                                      "parameters": ID}},
        "/uploads": {"post": _op("Start a chunked, resumable upload", ok="201")},
        "/uploads/{id}": {"get": {**_op("Bytes received so far (offset); once finished, the check's status "
                                        "(checking, refused, done) and progress, then its dataset or its refusal "
                                        "(error, details.validation)"), "parameters": [
                              {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]},
                          "delete": {**_op("Drop an upload and its bytes (409 while it is being checked)"),
                                     "parameters": [{"name": "id", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}]},
                          "put": {**_op("Append a chunk (raw body) at ?offset=N"), "parameters": [
                              {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                              {"name": "offset", "in": "query", "schema": {"type": "integer"}}]}},
        "/datasets/{id}/preview": {"get": {**_op("Records of a dataset", params=("offset", "limit")),
                                           "parameters": ID + [{"name": p, "in": "query", "schema": {
                                               "type": "integer"}} for p in ("offset", "limit")]}},
        "/jobs": {"get": {**_op("The jobs you may read, newest first, a page at a time (`next`: the page after, "
                                "null on the last)"), "parameters": [
                              {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                          "maximum": 500, "default": 500}},
                              {"name": "before", "in": "query", "schema": {"type": "integer"},
                               "description": "only jobs with a smaller id (what `next` sets)"},
                              {"name": "status", "in": "query", "schema": {"type": "string"},
                               "description": "comma-separated statuses, e.g. queued,running"},
                              {"name": "stage", "in": "query", "schema": {"type": "string"},
                               "description": "comma-separated stages"},
                              {"name": "owner", "in": "query", "schema": {"type": "string"},
                               "description": "a username"}]},
                  "post": _op("Submit a job", ok="201", body={"$ref": "#/components/schemas/JobCreate"})},
        "/jobs/estimate": {"post": _op("Validate a job request and estimate parameters, memory per device and time "
                                       "(nothing is stored)", body={"$ref": "#/components/schemas/JobCreate"})},
        "/jobs/{id}": {"get": {**_op("One job, with its queue place and its last 100 history events (the job's "
                                     "error and the events' messages follow Accept-Language, as errors do)"),
                               "parameters": ID}},
        "/jobs/{id}/metrics": {"get": {**_op("Metric points after a sequence number"), "parameters": ID + [
            {"name": "after", "in": "query", "schema": {"type": "integer"}}]}},
        "/jobs/{id}/logs": {"get": {**_op("Log text from an offset"), "parameters": ID + [
            {"name": "after", "in": "query", "schema": {"type": "integer"}}]}},
        "/jobs/{id}/cancel": {"post": {**_op("Cancel a queued or running job", ok="202"), "parameters": ID}},
        "/jobs/{id}/pause": {"post": {**_op("Pause: checkpoint, free the device, keep the place", ok="202"),
                                      "parameters": ID}},
        "/jobs/{id}/resume": {"post": {**_op("Back into the queue, continuing from the checkpoint", ok="202"),
                                       "parameters": ID}},
        "/jobs/{id}/retry": {"post": {**_op("Requeue a failed or interrupted job from its last checkpoint; "
                                            "half_batch: with half the batch size and twice the accumulation steps "
                                            "(after running out of memory)", ok="202"), "parameters": ID,
                                      "requestBody": {"required": False, "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {"half_batch": {"type": "boolean"}}}}}}}},
        "/jobs/{id}/clone": {"post": {**_op("Submit a copy; the body may change any field of a submission (config is "
                                            "merged over the job's)", ok="201"), "parameters": ID}},
        **{f"/{kind}/{{id}}/share": {"post": {**_op("Make it private, shared with one of your groups, or public"),
                                              "parameters": ID}} for kind in ("jobs", "datasets", "models")},
        "/models": {"get": _op("Models you can use, newest first, a page at a time (`next`: the page after, null on "
                               "the last; limit 1-500, default 500)", params=("limit", "offset"))},
        "/tokenizers": {"get": _op("Tokenizers you can use"),
                        "post": _op("Upload a tokenizer (multipart: name, tokenizer_json, tokenizer_config)", ok="201")},
        "/tokenizers/train": {"post": _op("Train a tokenizer on a dataset in the background", ok="202")},
        "/tokenizers/{id}": {"get": {**_op("One tokenizer"), "parameters": ID},
                             "delete": {**_op("Delete a tokenizer nothing uses and no worker is training (a queued "
                                              "training is cancelled; 409 lists what uses it)"), "parameters": ID}},
        "/tokenizers/{id}/encode": {"post": {**_op("Encode a text (the playground)"), "parameters": ID}},
        "/models/{id}": {"get": {**_op("One model version: lineage, verifications, final metrics, notes, tags"),
                                 "parameters": ID},
                         "patch": {**_op("Edit notes and tags", body={"type": "object", "properties": {
                             "notes": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}),
                                   "parameters": ID},
                         "delete": {**_op("Delete a model nothing uses (409 lists what uses it)"), "parameters": ID}},
        "/models/{id}/download": {"get": {**_op("Download weights: streamed, resumable with Range (206); hf, gguf "
                                                "and lora are zips, converted on first request and verified (gguf "
                                                "in llama.cpp)"),
                                          "parameters": ID + [
            {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["pth", "hf", "gguf", "lora"]}},
            {"name": "type", "in": "query", "description": "gguf: the file type (default q8_0)",
             "schema": {"type": "string", "enum": ["f16", "bf16", "q8_0", "q4_k_m"]}},
            {"name": "layout", "in": "query", "description": "hf of a MoE model: transformers5 (fused experts, "
                                                             "default) or transformers4 (4.57's layout)",
             "schema": {"type": "string", "enum": ["transformers5", "transformers4"]}}]}},
        "/models/{id}/evaluations": {"get": {**_op("The model's evaluations"), "parameters": ID},
                                     "post": {**_op("Queue an evaluation job (dataset, config: eval_records, "
                                                    "accuracy_tasks, max_gen_len)", ok="201"), "parameters": ID}},
        "/models/{id}/merge": {"post": {**_op("Merge a LoRA version into its base: a new full model version",
                                              ok="201"), "parameters": ID}},
        "/models/import": {"post": _op("Import a model (multipart: name, file = MiniMind .pth or zipped Hugging Face "
                                       "folder; config = JSON for a .pth; tokenizer_json + tokenizer_config or "
                                       "tokenizer = id)", ok="201")},
    },
    "x-openai-compatible": {"base_url": "/v1", "paths": ["GET /v1/models", "POST /v1/chat/completions"],
                            "description": "OpenAI's chat completions API (stream with SSE, reasoning_content when "
                                           "enable_thinking) with a MiniCloud API token as the key"},
}


def schema(request):
    return JsonResponse(SCHEMA)
