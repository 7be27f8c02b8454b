"""Architecture rules: no torch in Django processes at import time; no Django in the engine."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_django_processes_do_not_import_torch():
    code = (
        "import os, sys, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'minicloud.settings'); django.setup()\n"
        "import minicloud.urls, minicloud.asgi, jobs.tasks, jobs.supervisor, jobs.consumers, jobs.services, "
        "jobs.api, jobs.views, models_registry.api, models_registry.views, accounts.api\n"
        "from django.core.management import load_command_class\n"
        "load_command_class('minicloud', 'serve')\n"
        "load_command_class('jobs', 'data_cache')\n"
        "import jobs.dataset_stats, jobs.validation, training.token_cache, training.records\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers')))\n"
        "assert not bad, bad[:5]\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_training_package_never_imports_django_or_portal_apps():
    forbidden = ("django", "jobs", "accounts", "models_registry", "minicloud", "channels", "django_q")
    for path in (ROOT / "training").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {name}"


def test_no_module_named_datasets():
    assert not (ROOT / "datasets").exists() and not (ROOT / "datasets.py").exists()
