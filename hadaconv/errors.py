"""The one exception type users see.

Every failure caused by the user's input (a missing file, an unsupported width, a model with
nothing to convert, ...) raises a HadaconvError whose message is one self-contained line; the CLI
prints it as ``error: <message>`` and exits non-zero, never with a traceback.
"""


class HadaconvError(Exception):
    """A user-facing error with a one-line message."""
