"""Open whole-slide and plain images: :func:`open_slide` picks a backend, returns a Slide.

Backends (one module each, imported only when used):

========== ========================================= ===============================
name       reads                                     module
========== ========================================= ===============================
openslide  vendor formats OpenSlide detects          ``openslide_backend``
tiff       generic / OME pyramidal TIFF, SVS forced  ``tiff_backend`` (tifffile+zarr)
dicom      DICOM WSI OpenSlide cannot open           ``dicom_backend`` (wsidicom, else
                                                     pydicom frames: ``dicom_frames``)
image      PNG, JPEG, BMP, other Pillow images       ``image_backend`` (in memory)
array      a uint8 (H, W, 3) numpy array             ``array_backend``
========== ========================================= ===============================

Auto dispatch (``backend=None``): OpenSlide's format detection first; "generic-tiff" goes
to the tifffile backend (decodes only the touched tiles with imagecodecs and also sees
SubIFD pyramids, which OpenSlide's generic-tiff reader ignores), other vendors to OpenSlide.
If the tifffile backend cannot open a "generic-tiff", OpenSlide gets a try; a "dicom" file
OpenSlide cannot open goes to the dicom backend (wsidicom, then a pydicom frame reader),
whose error is the one reported. Files OpenSlide
does not recognise go by content: TIFF -> tiff (incl. OME-TIFF, stripped single images),
DICOM (``DICM`` magic or ``.dcm``) -> dicom, anything Pillow identifies -> image; the rest
is a SlideOpenError.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tilscore.errors import NotBrightfieldError, SlideOpenError, UsageError
from tilscore.slide.array_backend import ArrayBackend
from tilscore.slide.base import Backend, Slide

__all__ = ["BACKENDS", "Backend", "Slide", "open_slide"]

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiff", "dicom", "image")
SUPPORTED = (
    "OpenSlide formats (Aperio .svs, Hamamatsu .ndpi, MIRAX, Philips, Leica, Ventana, ...), "
    "pyramidal or OME TIFF, DICOM WSI, PNG/JPEG/BMP/TIFF images"
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path, mpp: float | None = None, *, backend: str | None = None) -> Slide:
    """Open `path` (a file, or a uint8 (H, W, 3) numpy array) as a :class:`Slide`.

    `mpp` (µm/px at level 0) overrides the file metadata and is required for arrays.
    `backend` forces one of :data:`BACKENDS` (None: auto, see module docstring).
    Raises SlideOpenError (missing/empty/unreadable file), NotBrightfieldError,
    UsageError (bad backend name or implausible mpp).
    """
    if backend is not None and backend not in (*BACKENDS, "array"):
        raise UsageError(
            f"unknown slide backend {backend!r}; choose one of: {', '.join(BACKENDS)} "
            "(or None for automatic; 'array' for numpy arrays)"
        )
    if isinstance(path, np.ndarray):
        return _open_array(path, mpp, backend)
    if backend == "array":
        raise UsageError(f"backend 'array' needs a numpy array, got {type(path).__name__}")
    try:
        path = Path(path)
    except TypeError as exc:
        raise UsageError(f"expected a path or a numpy array, got {type(path).__name__}") from exc
    _check_file(path)
    reader = _auto_backend(path) if backend is None else _make_backend(backend, path)
    try:
        return Slide(reader, path, mpp=mpp)
    except BaseException:
        reader.close()
        raise


def _open_array(array: np.ndarray, mpp: float | None, backend: str | None) -> Slide:
    if backend not in (None, "array"):
        raise UsageError(f"a numpy array is read with backend 'array', not {backend!r}")
    if mpp is None:
        raise UsageError("a numpy array has no pixel size: pass mpp= (µm/px)")
    return Slide(ArrayBackend(array), "array", mpp=mpp)


def _check_file(path: Path) -> None:
    """SlideOpenError for a missing path, a folder, an empty or unreadable file."""
    name = path.name or str(path)
    if not path.exists():
        raise SlideOpenError(f"{name}: no such file ({path})")
    if path.is_dir():
        raise SlideOpenError(
            f"{name}: is a folder, not a slide file (for a DICOM WSI folder pass one of its "
            ".dcm files)"
        )
    if not path.is_file():  # FIFO, socket, device: opening could block forever
        raise SlideOpenError(f"{name}: not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise SlideOpenError(f"{name}: cannot read the file ({exc.strerror or exc})") from exc
    if size == 0:
        raise SlideOpenError(f"{name}: empty file (0 bytes)")


def _make_backend(name: str, path: Path) -> Backend:
    """Instantiate backend `name` on `path` (imports its module only now)."""
    # lazy: a backend and its reader library load only for a slide that needs them
    # (`import tilscore.slide` loads none: test_importing_the_package_loads_no_backend_library)
    if name == "openslide":
        from tilscore.slide.openslide_backend import OpenSlideBackend as cls  # lazy: as above
    elif name == "tiff":
        from tilscore.slide.tiff_backend import TiffBackend as cls  # lazy: as above
    elif name == "dicom":
        from tilscore.slide.dicom_backend import open_dicom as cls  # lazy: as above
    else:
        from tilscore.slide.image_backend import ImageBackend as cls  # lazy: as above
    log.debug("opening %s with the %s backend", path, name)
    return cls(path)


def _auto_backend(path: Path) -> Backend:
    """Pick and open a backend for `path` (see the module docstring)."""
    fmt = _openslide_format(path)
    if fmt == "generic-tiff":
        return _first_that_opens(path, ("tiff", "openslide"))
    if fmt == "dicom":  # OpenSlide needs ImageType, wsidicom whole levels; frames need less
        return _first_that_opens(path, ("openslide", "dicom"), report_last=True)
    if fmt is not None:
        return _make_backend("openslide", path)
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[:4] in _TIFF_MAGIC:
        # No Pillow fallback: it would open a damaged pyramid as a one-level image.
        return _make_backend("tiff", path)
    if head[128:132] == b"DICM" or path.suffix.lower() == ".dcm":
        return _make_backend("dicom", path)
    from tilscore.slide.image_backend import is_pillow_image  # lazy: Pillow, as above

    if is_pillow_image(path):
        return _make_backend("image", path)
    raise SlideOpenError(
        f"{path.name}: not a slide or image tilscore can read (supported: {SUPPORTED})"
    )


def _first_that_opens(path: Path, names: tuple[str, ...], report_last: bool = False
                      ) -> Backend:
    """The first backend in `names` that opens `path`; else the first one's error (the
    last one's with `report_last`).

    NotBrightfieldError is final: another reader would not make the pixels RGB.
    """
    first_error: SlideOpenError | None = None
    for name in names:
        try:
            return _make_backend(name, path)
        except NotBrightfieldError:
            raise
        except SlideOpenError as exc:
            log.debug("%s backend failed on %s: %s", name, path.name, exc)
            first_error = exc if report_last else first_error or exc
    assert first_error is not None
    raise first_error


def _openslide_format(path: Path) -> str | None:
    """OpenSlide's format name for `path` ("aperio", "generic-tiff", ...) or None."""
    try:
        import openslide  # lazy: `import tilscore.slide` loads no reader library

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # OpenSlide missing or choking on the file: decide by content
        log.debug("OpenSlide format detection failed on %s", path, exc_info=True)
        return None
