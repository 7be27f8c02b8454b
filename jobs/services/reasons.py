"""The user-facing wording of why a job waits, will never fit, or was refused by the engine's spec check (English
templates, translated when shown)."""
from __future__ import annotations

from django.utils.translation import gettext as _, gettext_noop

WAIT_REASONS = {  # a reason code of scheduler.REASONS (or "new": not planned yet; "": it has a place)
    "": gettext_noop("starting"),
    "new": gettext_noop("just queued: its place is being planned"),
    "held": gettext_noop("held for an earlier multi-device job"),
    "gpu_memory": gettext_noop("waiting for %(n)s GPU(s) with %(gib)s GiB free"),
    "slots": gettext_noop("waiting for %(n)s free device slot(s)"),
    "no_nodes": gettext_noop("no worker node is running"),
    "slurm_pending": gettext_noop("waiting until the %(n)s job(s) already handed to Slurm start there"),
    "quota_running": gettext_noop("over your concurrent-job quota (%(n)s of %(limit)s running)"),
    "quota_hours": gettext_noop("you have used %(used)s of your %(limit)s device-hours this week"),
}


def wait_reason_text(code: str, p: dict) -> str:
    """Why a queued job waits, with the reason's parameters, in the active language."""
    template = WAIT_REASONS.get(code)
    return _(template) % (p or {}) if template is not None else code


def spec_error_text(exc) -> str:
    """A ``training.spec.SpecError`` about a config key in the active language (its message is a catalogue entry)."""
    return f"config.{exc.field}: {exc.text(_)}"


def never_fits_text(kind: str, p: dict) -> str:
    """``scheduler.never_fits``'s answer in the active language."""
    if kind == "gpus":
        return _("needs %(gpus)s devices on one node; the largest node has %(most)s") % p
    return (
        _("needs about %(gib)s GiB per GPU; the largest GPU has %(largest)s GiB (lower batch_size or max_seq_len)") % p
    )
