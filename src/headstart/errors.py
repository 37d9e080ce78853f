"""Errors a user can act on. The CLI prints their message without a traceback.

A message names what to change in the words of whoever called: `--overwrite` on the command line,
`overwrite=True` from Python (`option`; the CLI marks its calls with `speaking_cli`).
"""

from __future__ import annotations

import contextlib
import contextvars

_CLI = contextvars.ContextVar("headstart_cli", default=False)


@contextlib.contextmanager
def speaking_cli():
    """Within the block, `option` names command-line flags (the CLI's commands run inside it)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def in_cli() -> bool:
    """Whether the CLI is the caller (see `speaking_cli`)."""
    return _CLI.get()


def option(name: str, value: object = True) -> str:
    """A setting as the caller writes it: from the CLI `--name value`, or `--name` for a switch (value True) or
    for the setting itself (value None); from Python `name=value` (a str quoted), or `name` for None, in
    backticks. `name` is the Python name (`cache_dir`)."""
    if _CLI.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is True or value is None else f"{flag} {value}"
    if value is None:
        return f"`{name}`"
    return f"`{name}={value!r}`" if isinstance(value, str) else f"`{name}={value}`"


class HeadstartError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

    exit_code = 2


class DataError(HeadstartError):
    """The data folder, labels file or an image cannot be used as given."""


class WeightsNotFoundError(HeadstartError):
    """No source yielded usable pretrained weights for a backbone."""


class WeightsMismatchError(HeadstartError):
    """A weights file was found but does not fit the backbone (hash, keys or shapes)."""


class BundleError(HeadstartError):
    """A saved model bundle is missing, corrupt, or of an unknown format."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was kept and how to go on (a KeyboardInterrupt still, so nothing swallows it)."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept
