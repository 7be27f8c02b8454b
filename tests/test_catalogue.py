"""Every message the code and the templates mark for translation has its Simplified Chinese text in the compiled
catalogue users get (locale/zh_Hans/LC_MESSAGES/django.mo): a string added without one shows English to a zh-hans
reader. Strings are found as makemessages finds them: gettext_noop / gettext / _ / gettext_lazy / pgettext calls with
a literal, and ``{% translate "…" %}`` and ``{% blocktranslate %}`` blocks in templates."""
import ast
import gettext
import re
from pathlib import Path

from tests.source import parse

ROOT = Path(__file__).resolve().parents[1]
CALLS = {"gettext_noop", "_", "gettext", "gettext_lazy", "ngettext", "pgettext", "pgettext_lazy"}


def _catalogue() -> dict:
    with open(ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.mo", "rb") as f:
        return gettext.GNUTranslations(f)._catalog


def _marked_in_code():
    for path in sorted(ROOT.glob("*/**/*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in (".venv", "bench", "var") or "tests" in parts or "migrations" in parts:
            continue
        for node in ast.walk(parse(path)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CALLS):
                continue
            where, args = f"{path.relative_to(ROOT)}:{node.lineno}", node.args
            literal = [isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args]
            if node.func.id.startswith("pgettext"):
                if len(args) >= 2 and all(literal[:2]):
                    yield where, f"{args[0].value}\x04{args[1].value}"  # context, message
            elif literal[:1] == [True]:
                yield where, args[0].value


def _marked_in_templates():
    for path in sorted((ROOT / "templates").rglob("*.html")):
        text, where = path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))
        for m in re.finditer(r'{%\s*(?:translate|trans)\s+"((?:[^"\\]|\\.)*)"(?:\s+context\s+"([^"]*)")?', text):
            yield where, f"{m.group(2)}\x04{m.group(1)}" if m.group(2) else m.group(1)
        # a block's message as Django builds it: "%" doubled, {{ name }} as %(name)s, lines joined when trimmed
        for m in re.finditer(r"{%\s*blocktrans(?:late)?(?P<opts>[^%]*)%}(?P<body>.*?){%\s*endblocktrans(?:late)?\s*%}",
                             text, re.S):
            message = re.split(r"{%\s*plural\s*%}", m.group("body"))[0].replace("%", "%%")
            message = re.sub(r"{{\s*(\w+)\s*}}", r"%(\1)s", message)
            if "trimmed" in m.group("opts").split():
                message = " ".join(line.strip() for line in message.splitlines() if line.strip())
            context = re.search(r'context\s+"([^"]*)"', m.group("opts"))
            yield where, f"{context.group(1)}\x04{message}" if context else message


def test_every_marked_message_has_its_simplified_chinese_text():
    catalogue = _catalogue()
    marked = list(_marked_in_code()) + list(_marked_in_templates())
    assert len(marked) > 500  # the checker finds what the code marks
    missing = [(where, key.replace("\x04", " | ")) for where, key in marked
               if key.strip() and not catalogue.get(key, ngettext_form(catalogue, key))]
    assert missing == []


def ngettext_form(catalogue: dict, key: str):
    """A plural entry is catalogued as (msgid, 0)."""
    return catalogue.get((key, 0))
