"""tilscore: tumour-infiltrating lymphocyte scoring on whole-slide images.

Public entry points are imported lazily so that ``import tilscore`` stays cheap
(no torch, no OpenSlide until they are needed).
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tilscore")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "open_slide"]


def open_slide(path, mpp=None, *, backend=None):
    """Open a whole-slide image or plain image; see :func:`tilscore.slide.open_slide`."""
    # lazy: every `import tilscore.<module>` (the CLI's too) runs this file first
    from tilscore.slide import open_slide as _open

    return _open(path, mpp=mpp, backend=backend)
