"""JSON-lines events on stdout: the engine's only channel to the portal (docs/training-spec.md).

Under a supervisor each event line starts with the run's token (``MINICLOUD_EVENT_TOKEN``, drawn per run by the
supervisor) and a space: the supervisor takes only such lines as events, and anything else the process prints (stderr,
a library's warnings, text a user controls such as a chat template's error message) stays log text, however it looks.
Run by hand, without the token, the lines are plain JSON."""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time


STARTED = time.time()  # when this engine process (or forked warm child: training.warm resets it) started


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def emit(event: str, **fields) -> None:
    """Write one event line and flush, so the supervisor sees it at once. Rank 0 alone reports, but for errors: a
    rank that fails says why (with its ``rank``), since its failure is what stops the others."""
    if not is_rank0():
        if event != "error":
            return
        fields["rank"] = int(os.environ["RANK"])
    fields = {"event": event, "time": round(time.time(), 3), **fields}
    token = os.environ.get("MINICLOUD_EVENT_TOKEN")
    line = json.dumps(finite(fields), ensure_ascii=False, default=str)
    sys.stdout.write(f"{token} {line}\n" if token else line + "\n")
    sys.stdout.flush()


def parse(line: str, token: str) -> tuple[dict | None, str]:
    """(the event, the line without the token) for a line ``emit`` wrote under ``token`` (the supervisor's, or any
    reader of an engine child's stdout); (None, line) for anything else, however much it looks like one. The first
    word is compared as bytes: a line may start with any text (a rollout, a warning in Chinese)."""
    head, sep, rest = line.partition(" ")
    if not sep or not secrets.compare_digest(head.encode("utf-8", "surrogatepass"), token.encode()):
        return None, line
    try:
        event = json.loads(rest, parse_constant=lambda _name: None)  # NaN: no database stores it
    except (json.JSONDecodeError, RecursionError):
        return None, rest
    return (event if isinstance(event, dict) and "event" in event else None), rest


def finite(value):
    """``value`` with NaN and infinities as null: JSON has no such numbers (PostgreSQL refuses them, browsers cannot
    parse them), and a gap in a chart says as much."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def log(message: str, level: str = "info") -> None:
    emit("log", level=level, message=message)
