"""Exception types whose message is one readable line for the user.

The CLI maps :class:`UsageError` to exit code 2 and :class:`InputError` to exit
code 1 (an input failed; other inputs may still have been processed).
"""

from __future__ import annotations


class TilscoreError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""

    exit_code = 1


class UsageError(TilscoreError):
    """Bad command line, configuration or option value (exit code 2)."""

    exit_code = 2


class InputError(TilscoreError):
    """An input (slide, image, label file) could not be used (exit code 1)."""

    exit_code = 1


class SlideOpenError(InputError):
    """The file does not exist, is empty, or is not a slide/image we can read."""


class SlideReadError(InputError):
    """Opening worked but decoding pixels failed (corrupt tile, truncated file)."""


class MissingMppError(InputError):
    """The slide has no pixel size in its metadata and none was given."""


class NotBrightfieldError(InputError):
    """The image is not 8-bit RGB brightfield (fluorescence, multiplex, 16-bit, ...)."""
