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


# What a training process inherits from the portal's environment: the system's and the libraries' own settings, the
# engine's MINICLOUD_ knobs that training/ reads, never the portal's secrets (database and Redis URLs, the secret key,
# the first admin's password: a process that runs a user's data and templates has no use for them).
ENGINE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "PYTHONPATH",
              "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "MINICLOUD_HOME", "MINICLOUD_LAZY_DATA_MB",
              "MINICLOUD_MAX_LINE_MB", "MASTER_ADDR", "MASTER_PORT")
ENGINE_ENV_PREFIXES = ("LC_", "CUDA_", "NCCL_", "NVIDIA_", "TORCH", "TRITON_", "HF_", "TRANSFORMERS_", "GLOO_",
                       "KMP_", "PYTORCH_", "XDG_")


def engine_env(environ=os.environ) -> dict:
    """The environment a training process starts with (see ENGINE_ENV)."""
    return {k: v for k, v in environ.items() if k in ENGINE_ENV or k.startswith(ENGINE_ENV_PREFIXES)}


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
