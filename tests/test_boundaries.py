"""Architecture rules (docs/architecture.md): the layer order of the packages, no torch in Django processes at
import time, no Django in the engine, settings without side effects."""
import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.source import parse

ROOT = Path(__file__).resolve().parents[1]

# The layer order: a module may import its own layer and those below it, never one above. Entry points (the modules
# a request, a message, a task or a command enters through) sit above every app and may import any of them.
LAYERS = {"training": 0, "minicloud": 1, "accounts": 2, "jobs": 3, "models_registry": 4}
ENTRY = 5
ENTRY_MODULES = {"views", "api", "openai_api", "consumers", "tasks", "urls", "routing", "asgi", "wsgi", "admin",
                 "forms", "apps", "signals", "supervisor", "wsauth", "middleware"}


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name; None outside our packages (the standard library, Django, torch...)."""
    parts = module.split(".")
    if parts[0] not in LAYERS:
        return None
    if "management" in parts or any(p in ENTRY_MODULES for p in parts[1:]):
        return ENTRY
    return LAYERS[parts[0]]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node, package: str, root: Path) -> list[str]:
    """The modules an import statement names (``from X import Y``: X, and X.Y where Y is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
    out = [base]
    for a in node.names:
        sub = root.joinpath(*f"{base}.{a.name}".split("."))
        if sub.with_suffix(".py").exists() or sub.is_dir():
            out.append(f"{base}.{a.name}")
    return out


def upward_imports(root: Path = ROOT) -> list[str]:
    """Every import (at module level or inside a function) of a module from a higher layer than the importer's."""
    found = []
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).parts
            if "tests" in rel or "migrations" in rel:
                continue
            me = _module_name(path, root)
            package = me if path.name == "__init__.py" else me.rpartition(".")[0]
            for node in ast.walk(parse(path)):
                for target in _imported(node, package, root):
                    theirs = layer_of(target)
                    if theirs is not None and theirs > layer_of(me):
                        found.append(f"{me} (line {node.lineno}) imports {target}")
    return found


def test_no_package_imports_one_above_it():
    assert upward_imports() == []


def test_the_layer_check_finds_an_upward_import(tmp_path):
    """The checker itself: a service of accounts importing jobs, or jobs importing a view, is refused; a view
    importing any app, a model importing a lower app, and a relative import within an app are not."""
    files = {
        "accounts/__init__.py": "", "jobs/__init__.py": "", "models_registry/__init__.py": "",
        "accounts/services.py": "def f():\n    from jobs.models import Job\n",
        "accounts/models.py": "from minicloud.errors import ServiceError\n",
        "jobs/models.py": "from accounts.models import Shareable\nfrom .selectors import x\n",
        "jobs/selectors.py": "from . import views\n",
        "jobs/views.py": "from models_registry.models import ModelVersion\n",
        "models_registry/models.py": "from jobs.models import Job\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert upward_imports(tmp_path) == ["accounts.services (line 2) imports jobs.models",
                                        "jobs.selectors (line 1) imports jobs.views"]


def test_settings_import_has_no_side_effects(tmp_path):
    """Importing the settings module writes no file, imports none of our apps and probes no device."""
    home = tmp_path / "home"
    code = ("import sys\nimport minicloud.settings\n"
            "ours = sorted(m for m in sys.modules if m.split('.')[0] in ('accounts', 'jobs', 'models_registry',"
            " 'training', 'pynvml', 'torch'))\n"
            "assert not ours, ours\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env={**os.environ, "MINICLOUD_HOME": str(home), "SECRET_KEY": ""})
    assert not home.exists()


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
        tree = parse(path)
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
