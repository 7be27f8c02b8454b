from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, register_converter

from accounts import api as accounts_api
from accounts import views as accounts_views
from accounts.forms import RateLimitedAuthenticationForm
from jobs import api as jobs_api
from jobs import views as jobs_views
from models_registry import api as models_api
from models_registry import openai_api
from models_registry import views as models_views

from . import openapi


class ExportFormat:
    """``csv`` or ``json``: the formats a metrics export comes in."""

    regex = "csv|json"

    def to_python(self, value):
        return value

    def to_url(self, value):
        return value


register_converter(ExportFormat, "export")

api_v1 = [
    path("health", jobs_api.health),
    path("openapi.json", openapi.schema),
    path("auth/token", accounts_api.token),
    path("me", accounts_api.me),
    path("devices", jobs_api.devices),
    path("datasets", jobs_api.datasets),
    path("uploads", jobs_api.uploads),
    path("uploads/<str:upload_id>", jobs_api.upload_detail),
    path("datasets/<int:dataset_id>", jobs_api.dataset_detail),
    path("datasets/<int:dataset_id>/preview", jobs_api.dataset_preview),
    path("jobs", jobs_api.jobs),
    path("jobs/estimate", jobs_api.job_estimate),
    path("jobs/<int:job_id>", jobs_api.job_detail),
    path("jobs/<int:job_id>/metrics", jobs_api.job_metrics),
    path("jobs/<int:job_id>/logs", jobs_api.job_logs),
    path("jobs/<int:job_id>/cancel", jobs_api.job_cancel),
    path("jobs/<int:job_id>/pause", jobs_api.job_pause),
    path("jobs/<int:job_id>/resume", jobs_api.job_resume),
    path("jobs/<int:job_id>/retry", jobs_api.job_retry),
    path("jobs/<int:job_id>/clone", jobs_api.job_clone),
    path("jobs/<int:pk>/share", accounts_api.share, {"kind": "job"}),
    path("datasets/<int:pk>/share", accounts_api.share, {"kind": "dataset"}),
    path("models/<int:pk>/share", accounts_api.share, {"kind": "model"}),
    path("models", models_api.models),
    path("tokenizers", models_api.tokenizers),
    path("tokenizers/train", models_api.tokenizer_train),
    path("tokenizers/<int:tokenizer_id>", models_api.tokenizer_detail),
    path("tokenizers/<int:tokenizer_id>/encode", models_api.tokenizer_encode),
    path("models/<int:model_id>", models_api.model_detail),
    path("models/<int:model_id>/download", models_api.model_download),
    path("models/<int:model_id>/merge", models_api.model_merge),
    path("models/<int:model_id>/evaluations", models_api.model_evaluations),
    path("models/import", models_api.model_import),
]

openai_v1 = [
    path("models", openai_api.models),
    path("chat/completions", openai_api.chat_completions),
]

urlpatterns = [
    path("", jobs_views.dashboard, name="dashboard"),
    path("metrics", jobs_views.metrics, name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(authentication_form=RateLimitedAuthenticationForm),
         name="login"),
    path("accounts/password/", auth_views.PasswordChangeView.as_view(success_url="/accounts/password/done/"),
         name="password_change"),
    path("accounts/password/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
    path("accounts/tokens/", accounts_views.tokens, name="tokens"),
    path("accounts/integrations/", jobs_views.integrations, name="integrations"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("i18n/setlang/", jobs_views.set_language, name="set_language"),  # Django's, remembered for notifications
    path("jobs/new/", jobs_views.job_new, name="job_new"),
    path("jobs/new/estimate", jobs_views.job_estimate, name="job_estimate"),
    path("jobs/<int:job_id>/", jobs_views.job_detail, name="job_detail"),
    path("jobs/compare/", jobs_views.compare, name="job_compare"),
    path("jobs/compare/metrics.<export:fmt>", jobs_views.compare_metrics_export, name="compare_metrics"),
    path("jobs/<int:job_id>/metrics.<export:fmt>", jobs_views.job_metrics_export, name="job_metrics_export"),
    path("jobs/<int:job_id>/tensorboard.zip", jobs_views.job_tensorboard, name="job_tensorboard"),
    path("jobs/<int:job_id>/log.txt", jobs_views.job_log, name="job_log"),
    path("jobs/<int:job_id>/<str:action>/", jobs_views.job_action, name="job_action"),
    path("queue/", jobs_views.queue, name="queue"),
    path("devices/", jobs_views.devices, name="devices"),
    path("datasets/", jobs_views.datasets, name="datasets"),
    path("datasets/upload/", jobs_views.dataset_upload, name="dataset_upload"),
    path("uploads/<str:upload_id>/delete/", jobs_views.upload_delete, name="upload_delete"),
    path("datasets/<int:dataset_id>/", jobs_views.dataset_detail, name="dataset_detail"),
    path("datasets/<int:dataset_id>/stats.json", jobs_views.dataset_stats, name="dataset_stats"),
    path("datasets/<int:dataset_id>/<str:action>/", jobs_views.dataset_action, name="dataset_action"),
    path("models/", models_views.model_list, name="models"),
    path("tokenizers/", models_views.tokenizer_list, name="tokenizers"),
    path("tokenizers/<int:tokenizer_id>/", models_views.tokenizer_detail, name="tokenizer_detail"),
    path("tokenizers/<int:tokenizer_id>/delete/", models_views.tokenizer_delete, name="tokenizer_delete"),
    path("models/<int:model_id>/", models_views.model_detail, name="model_detail"),
    path("models/<int:model_id>/download/", models_views.model_download, name="model_download"),
    path("models/<int:model_id>/<str:action>/", models_views.model_action, name="model_action"),
    path("models/import/", models_views.model_import, name="model_import"),
    path("models/evaluations/", models_views.evaluations, name="model_evaluations"),
    path("playground/", models_views.playground, name="playground"),
    path("usage/", accounts_views.usage, name="usage"),
    path("groups/", accounts_views.group_list, name="groups"),
    path("groups/<int:group_id>/", accounts_views.group_detail, name="group_detail"),
    path("share/<str:kind>/<int:pk>/", accounts_views.share, name="share"),
    path("usage/report.csv", accounts_views.usage_report_csv, name="usage_report"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("v1/", include(openai_v1)),
]

handler400 = "minicloud.views.bad_request"
