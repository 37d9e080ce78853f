"""Errors a user can act on. The CLI prints their message without a traceback."""


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
