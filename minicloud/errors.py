"""The one exception services raise for a refused request (views show it, the API answers it as JSON), and the
readings of a client's values that every view and service needs (a name, a whole number, an object's id), whatever
type the client sent: never a ValueError or a database error from "abc", "²", 1.5, true or 2**70; and
``stored_text``, a message kept (or sent by the engine) as an English template and its parameters, in the reader's
language."""
import json
import math
import re

from django.utils.translation import gettext, gettext as _

from training.spec import render


class ServiceError(Exception):
    """A refused request. ``status`` is the HTTP status the API answers with; ``field`` names the bad input."""

    def __init__(self, message, *, status=400, field=None, details=None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.details = details  # extra JSON for the API (e.g. a dataset's line-numbered errors)


def stored_text(template: str, params: dict | None) -> str:
    """A message stored as an English template (marked with gettext_noop where it is written) and its parameters,
    in the active language. Text stored without parameters (records written before, the engine's own errors) is
    shown as it is. A parameter that is itself a (template, params) pair is translated too (``training.spec.render``:
    "dataset line 7: " and what is wrong with it)."""
    if params is None:
        return template
    try:
        return render(template, params, gettext)
    except (KeyError, TypeError, ValueError):  # a catalogue entry that does not fit: the English one
        try:
            return render(template, params)
        except (KeyError, TypeError, ValueError):
            return template


def explained(report: dict) -> tuple[str, dict] | None:
    """The English template and parameters of an error the engine explains (its error event or its conversions'
    JSON report: ``training.spec.Explained``), or None when it sent only a line of text."""
    if report.get("template") and isinstance(report.get("params"), dict):
        return report["template"], report["params"]
    return None


def clean_name(value, max_length: int, field: str = "name") -> str:
    """A name as a client sent it, stripped: 1 to ``max_length`` characters of text."""
    name = value.strip() if isinstance(value, str) else ""
    if not name or len(name) > max_length:
        raise ServiceError(_("%(field)s: 1 to %(max)s characters") % {"field": field, "max": max_length}, field=field)
    return name


def int_or_none(value) -> int | None:
    """A whole number as a client sent it: an integer, an integral float, or its text (ASCII digits, at most 18, a
    minus allowed: ``str.isdigit`` also takes "²", which ``int`` refuses); None for anything else."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def id_or_none(value) -> int | None:
    """An object's id as a client sent it (a positive integer or its digits, not a float), or None: ``filter(pk=...)``
    with it matches nothing rather than raising for "abc"."""
    number = None if isinstance(value, float) else int_or_none(value)
    return number if number is not None and 0 < number < 2**63 else None


def whole_number(value, field: str, low: int, high: int) -> int:
    """An integer as a client sent it (``int_or_none``), from low to high; a ServiceError naming the field otherwise."""
    value = int_or_none(value)
    if value is None or not low <= value <= high:
        raise ServiceError(_("%(field)s: a whole number from %(low)s to %(high)s")
                           % {"field": field, "low": low, "high": high}, field=field)
    return value


def strict_loads(raw):
    """``json.loads`` that refuses what JSON has no numbers for (NaN, Infinity, 1e400), with a ValueError; so is
    nesting too deep for the parser, and an integer too long to read (Python's 4300 digits)."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large")
    return value
