"""One presentation of user errors: a one-line ``error:`` message and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


def data_error_message(error: BaseException) -> str:
    """The message of a :class:`DataError`, without the worker traceback DataLoader adds."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    for name in (prefix, f"{type(error).__name__}: "):
        last = last.removeprefix(name)
    return last


def run_reporting_errors(run: Callable[[], int]) -> int:
    """``run()``, with bad input (data, files, values, keys) printed as one ``error:`` line.

    Returns:
        ``run()``'s exit code, or 2 after a user error.
    """
    from mmpt.datamodules.stages import DataError

    try:
        return run()
    except DataError as e:
        message = data_error_message(e)
    except (FileNotFoundError, ValueError, KeyError) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2
