"""OpenSlide backend: every vendor format OpenSlide reads (Aperio, Hamamatsu, Leica,
MIRAX, Philips, Sakura, Trestle, Ventana, Zeiss, DICOM, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tilscore.errors import SlideOpenError, SlideReadError
from tilscore.slide.tiff_backend import composite_on_white, mpp_from_resolution, one_line

log = logging.getLogger(__name__)


class OpenSlideBackend:
    """A slide opened with ``openslide.OpenSlide``.

    ``properties`` are OpenSlide's (``openslide.*``, ``tiff.*``, vendor keys) plus
    ``tilscore.associated_images`` (comma-joined names such as ``label,macro,thumbnail``).
    ``metadata_mpp`` is the mean of ``openslide.mpp-x``/``-y``, else derived from
    ``tiff.XResolution``/``YResolution`` + ``tiff.ResolutionUnit``, else None.
    """

    def __init__(self, path: str | Path):
        import openslide

        self._path = Path(path)
        self._name = self._path.name
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

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) of `level` at level pixel (x, y), alpha on white.

        OpenSlide takes the origin in level-0 pixels: (x, y) * level downsample, rounded.
        """
        ds = self._downsamples[level]
        origin_l0 = (int(round(x * ds)), int(round(y * ds)))
        try:
            rgba = np.asarray(self._osr.read_region(origin_l0, level, (width, height)))
        except Exception as exc:
            # After an OpenSlideError the handle stays in error state: later reads fail too.
            raise SlideReadError(
                f"{self._name}: cannot decode region at level {level} ({x}, {y}): {one_line(exc)}"
            ) from exc
        return composite_on_white(rgba)

    def close(self) -> None:
        self._osr.close()


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
