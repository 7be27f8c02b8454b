"""The header's menu: one entry per section, the current one marked (``aria-current="page"``) on its own pages and
on the pages below it (a job's page belongs to the dashboard, a dataset's to Datasets)."""
from django.urls import reverse
from django.utils.translation import gettext_lazy as _

# (url name of the entry, label, the url names of the pages it covers)
SECTIONS = (
    ("dashboard", _("Dashboard"), {"dashboard", "job_detail", "job_compare"}),
    ("job_new", _("New job"), {"job_new"}),
    ("queue", _("Queue"), {"queue"}),
    ("datasets", _("Datasets"), {"datasets", "dataset_upload", "dataset_detail"}),
    ("models", _("Models"), {"models", "model_detail", "model_import", "model_evaluations"}),
    ("playground", _("Playground"), {"playground"}),
    ("tokenizers", _("Tokenizers"), {"tokenizers", "tokenizer_detail"}),
    ("devices", _("Devices"), {"devices"}),
    ("usage", _("My usage"), {"usage"}),
    ("groups", _("Groups"), {"groups", "group_detail"}),
)


def navigation(request):
    """Template context processor: ``nav``, the menu entries for a signed-in user (none for anyone else)."""
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {"nav": []}
    match = getattr(request, "resolver_match", None)
    current = match.url_name if match else None
    return {"nav": [{"url": reverse(name), "label": label, "current": current in pages}
                    for name, label, pages in SECTIONS]}
