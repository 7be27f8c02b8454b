"""Operating-system process helpers shared by the portal's processes: ``serve`` (its children), the supervisor (a
job's engine), the warm engine's client and the inference workers. The process model: docs/architecture.md."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from training.warm import die_with_parent as _die_with_parent


def die_with_parent(sig: int):
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies (prctl PR_SET_PDEATHSIG; the
    child exits at once if the parent is already gone)."""
    return lambda: _die_with_parent(sig)


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_group(pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process group (a training child, a `serve` child); gone or not ours is not an error."""
    if pid:
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
