"""One presentation of user errors: an ``error:`` block (exit code 2), tracebacks on request.

Every ``mmpt`` command runs through :func:`run_reporting_errors`. Bad input (config, data,
weights, checkpoint, device) prints as ``error: <message>`` on stderr, without a traceback;
``MMPT_DEBUG=1`` re-raises instead, so the full traceback shows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

#: Environment variable that shows the traceback of a user error (``MMPT_DEBUG=1``).
DEBUG_ENV = "MMPT_DEBUG"
#: Longest message printed, in lines; the rest is cut (``MMPT_DEBUG=1`` shows all).
MAX_LINES = 25
# Lines of jsonargparse's union errors that say nothing to a user (and dump Namespaces).
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes: [",
    "Given value type:",
    "Given value: Namespace(",
    "Given value: NestedArg(",
    "- Expected a <class 'NoneType'>",
)


class UserError(ValueError):
    """A user error whose message is laid out already: its lines are printed as they are."""


def data_error_message(error: BaseException) -> str:
    """The message of a :class:`DataError`, without the worker traceback DataLoader adds."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    for name in (prefix, f"{type(error).__name__}: "):
        last = last.removeprefix(name)
    return last


def _user_error_types() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from mmpt.datamodules.stages import DataError

    return (
        DataError,
        FileNotFoundError,
        ValueError,
        KeyError,
        argparse.ArgumentError,
        MisconfigurationException,
    )


def _raised_by_jsonargparse(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def _root_user_error(error: BaseException) -> BaseException:
    """The error a user should read: jsonargparse's wrappers around a component's error peeled.

    jsonargparse re-raises what a class raised while being built inside a union error that
    dumps the whole config; the component's own error (the first in the chain that jsonargparse
    did not raise) names the flag and what to do.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not _raised_by_jsonargparse(current) and not isinstance(current, argparse.ArgumentError):
            return current
        current = current.__cause__ or current.__context__
    return error


def user_error_message(error: BaseException) -> str:
    """``error``'s message as printed after ``error:`` (at most :data:`MAX_LINES` lines)."""
    from mmpt.datamodules.stages import DataError

    if isinstance(error, DataError):
        return data_error_message(error)
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, argparse.ArgumentError):
        text = error.message if error.argument_name is None else str(error)
    else:
        text = str(error)
    if isinstance(error, UserError | argparse.ArgumentError):
        lines = [ln.rstrip() for ln in text.strip().splitlines()]
        lines = [ln for ln in lines if ln.strip() and not ln.strip().startswith(_NOISE)]
    else:  # one line, as every command printed it so far
        lines = [" ".join(text.split())]
    if len(lines) > MAX_LINES:
        cut = len(lines) - MAX_LINES + 1
        lines = [*lines[: MAX_LINES - 1], f"... ({cut} more lines: {DEBUG_ENV}=1 shows them)"]
    return "\n".join(lines)


def report_user_error(error: BaseException) -> int:
    """Print ``error`` as an ``error:`` block on stderr; returns the exit code (2)."""
    print(f"error: {user_error_message(_root_user_error(error))}", file=sys.stderr)
    return 2


def debug_enabled() -> bool:
    """Whether ``MMPT_DEBUG`` asks for tracebacks (any value but empty, ``0`` or ``false``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_reporting_errors(run: Callable[[], int]) -> int:
    """``run()``, with bad input (data, files, values, keys, flags) printed as an ``error:`` block.

    With ``MMPT_DEBUG=1`` the error is raised again, so Python prints its traceback.

    Returns:
        ``run()``'s exit code, or 2 after a user error.
    """
    try:
        return run()
    except _user_error_types() as e:
        if debug_enabled() or not isinstance(_root_user_error(e), _user_error_types()):
            raise  # asked for, or a bug a component raised inside jsonargparse's wrapper
        return report_user_error(e)
