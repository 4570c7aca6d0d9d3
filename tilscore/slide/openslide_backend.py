"""OpenSlide backend: every vendor format OpenSlide reads (Aperio, Hamamatsu, Leica,
MIRAX, Philips, Sakura, Trestle, Ventana, Zeiss, DICOM, ...)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import openslide

from tilscore.errors import SlideOpenError, SlideReadError
from tilscore.slide.common import composite_on_white, mpp_from_resolution, one_line

log = logging.getLogger(__name__)


class OpenSlideBackend:
    """A slide opened with ``openslide.OpenSlide``.

    ``properties`` are OpenSlide's (``openslide.*``, ``tiff.*``, vendor keys) plus
    ``tilscore.associated_images`` (comma-joined names such as ``label,macro,thumbnail``).
    ``metadata_mpp`` is the mean of ``openslide.mpp-x``/``-y``, else derived from
    ``tiff.XResolution``/``YResolution`` + ``tiff.ResolutionUnit``, else None.
    """

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._name = self._path.name
        self._lock = threading.Lock()
        self._retired: list = []
        try:
            self._osr = openslide.OpenSlide(str(self._path))
        except Exception as exc:
            raise SlideOpenError(
                f"{self._name}: OpenSlide cannot open it ({one_line(exc)})"
            ) from exc
        try:
            props = dict(self._osr.properties)
            props["tilscore.associated_images"] = ",".join(self._osr.associated_images.keys())
            self.properties = props
            self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
            self.level_dimensions = tuple(tuple(d) for d in self._osr.level_dimensions)
            self._downsamples = tuple(self._osr.level_downsamples)
            self.metadata_mpp = _mpp_from_properties(props)
        except Exception as exc:
            self._osr.close()
            raise SlideOpenError(f"{self._name}: bad slide metadata ({one_line(exc)})") from exc

    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) of `level` at level pixel (x, y), alpha on white.

        OpenSlide takes the origin in level-0 pixels: (x, y) * level downsample, rounded.
        """
        ds = self._downsamples[level]
        origin_l0 = (int(round(x * ds)), int(round(y * ds)))
        osr = self._osr
        try:
            rgba = np.asarray(osr.read_region(origin_l0, level, (width, height)))
        except Exception as exc:
            self._replace_failed_handle(osr)
            raise SlideReadError(
                f"{self._name}: cannot decode region at level {level} ({x}, {y}): {one_line(exc)}"
            ) from exc
        return composite_on_white(rgba)

    def _replace_failed_handle(self, failed) -> None:
        """After an OpenSlideError a handle stays in error state and every later read fails,
        so one corrupt JPEG tile would fail the whole slide. Swap in a fresh handle (once
        per failure, whichever thread sees it first); the failed one is not closed here
        because another thread may still be inside it, only retired until close()."""
        with self._lock:
            if self._osr is not failed:
                return  # another thread already reopened
            try:
                fresh = openslide.OpenSlide(str(self._path))
            except Exception:  # cannot reopen: keep failing with the original error
                return
            self._retired.append(failed)
            self._osr = fresh

    def close(self) -> None:
        with self._lock:
            for handle in (*self._retired, self._osr):
                handle.close()
            self._retired.clear()


def _mpp_from_properties(props: dict[str, str]) -> float | None:
    """µm/px at level 0 from OpenSlide properties, or None."""
    try:
        mpps = [float(props[f"openslide.mpp-{axis}"]) for axis in ("x", "y")]
        if all(m > 0 for m in mpps):
            return (mpps[0] + mpps[1]) / 2.0
    except (KeyError, ValueError):
        pass
    unit = props.get("tiff.ResolutionUnit")
    try:
        res = [float(props[f"tiff.{axis}Resolution"]) for axis in ("X", "Y")]
    except (KeyError, ValueError):
        return None
    mpps = [mpp_from_resolution(r, unit) for r in res]
    if None in mpps:
        return None
    return (mpps[0] + mpps[1]) / 2.0
