"""The one error type users see. Lives in the runtime so the runtime stays import-light."""


class FeatherError(Exception):
    """A user-facing error: bad input, bad artifact, bad configuration.

    The message says what is wrong and what to change. The CLI prints it and exits non-zero
    without a traceback.
    """
