"""tifffile + zarr backend: the fast path for pyramidal TIFF, OME-TIFF and (forced) SVS.

Each pyramid level is a zarr array over tifffile's ``ZarrTiffStore`` (``series.aszarr``),
so a read decodes only the tiles (or strips) it touches, with imagecodecs. Accepted
layouts: 8-bit RGB interleaved (Y, X, 3), RGBA (alpha composited on white), planar RGB
(3, Y, X); anything else (16-bit, greyscale, multi-channel fluorescence) raises
NotBrightfieldError. Aperio JPEG 2000 tiles in YCbCr (compression 33003) are converted
to RGB here, as OpenSlide does.

The helpers it shares with the other backends are in :mod:`tilscore.slide.common`.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
import zarr

from tilscore.errors import NotBrightfieldError, SlideOpenError, SlideReadError
from tilscore.slide.common import (
    RESUNIT_NAMES,
    UNIT_UM,
    composite_on_white,
    mpp_from_resolution,
    one_line,
)

log = logging.getLogger(__name__)

_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
_COMPRESSION_APERIO_JP2K_YCBCR = 33003
_EXTRASAMPLE_ASSOCALPHA = 1
_TIFF_TAGS_AS_PROPERTIES = (
    "ImageDescription", "Make", "Model", "Software", "DateTime", "Artist", "Copyright",
    "HostComputer", "DocumentName", "XResolution", "YResolution", "ResolutionUnit",
)  # fmt: skip


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) full-range YCbCr (JFIF / BT.601) -> uint8 RGB."""
    y, cb, cr = (ycc[..., k].astype(np.float32) for k in range(3))
    cb -= 128.0
    cr -= 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class TiffBackend:
    """Pyramidal TIFF read through tifffile + zarr. See the module docstring for layouts.

    ``vendor`` is "aperio" (SVS), "ome-tiff" or "generic-tiff". ``metadata_mpp`` comes
    from OME PhysicalSizeX (with its unit), else the Aperio "MPP =" description field,
    else X/YResolution with ResolutionUnit (unit NONE: unknown).
    """

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._name = self._path.name
        try:
            self._tf = tifffile.TiffFile(self._path)
        except Exception as exc:
            raise SlideOpenError(f"{self._name}: not a readable TIFF ({one_line(exc)})") from exc
        try:
            self._setup()
        except (NotBrightfieldError, SlideOpenError):
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SlideOpenError(
                f"{self._name}: cannot read the TIFF structure ({one_line(exc)})"
            ) from exc

    # -- opening ----------------------------------------------------------------------
    def _setup(self) -> None:
        tf = self._tf
        if not tf.series:
            raise SlideOpenError(f"{self._name}: TIFF holds no image")
        areas = [_area(s.levels[0]) for s in tf.series]
        series_index = int(np.argmax(areas))  # first of the largest: the main image
        series = tf.series[series_index]
        self._check_brightfield(series)
        self._check_not_truncated(series)

        self._levels = []  # zarr arrays, level 0 first
        self._ycbcr = []  # per level: tiles hold YCbCr (Aperio 33003), convert after reading
        dims = []
        for k, level in enumerate(series.levels):
            arr = zarr.open(series.aszarr(level=k), mode="r")
            if tuple(arr.shape) != tuple(level.shape):
                raise SlideOpenError(f"{self._name}: zarr shape {arr.shape} != {level.shape}")
            self._levels.append(arr)
            self._ycbcr.append(level.keyframe.compression == _COMPRESSION_APERIO_JP2K_YCBCR)
            dims.append(_width_height(level))
        self.level_dimensions = tuple(dims)

        axes = series.axes
        self._color_axis = "S"
        extra = [a for a in axes if a not in "YXS"]
        if any(series.shape[axes.index(a)] > 1 for a in extra):
            log.warning(
                "%s: series has axes %s; reading only the first plane of %s",
                self._name,
                axes,
                ",".join(extra),
            )
        # Index template: extra axes -> 0; remaining order of Y, X, S gives the transpose.
        kept = [a for a in axes if a in "YXS"]
        self._perm = tuple(kept.index(a) for a in "YXS")
        self._axes = axes
        keyframe = series.levels[0].keyframe
        self._premultiplied = _EXTRASAMPLE_ASSOCALPHA in tuple(np.atleast_1d(keyframe.extrasamples))

        self.vendor = "aperio" if tf.is_svs else "ome-tiff" if tf.is_ome else "generic-tiff"
        self.properties = self._properties(keyframe, series_index)
        self.metadata_mpp = self._mpp(keyframe, series_index)
        log.debug(
            "%s: tifffile series %d (%s), levels %s, mpp %s",
            self._name,
            series_index,
            axes,
            self.level_dimensions,
            self.metadata_mpp,
        )

    def _check_brightfield(self, series) -> None:
        """Raise NotBrightfieldError unless the series is 8-bit RGB(A)."""
        name, axes, shape = self._name, series.axes, series.shape
        if np.dtype(series.dtype) != np.uint8:
            bits = np.dtype(series.dtype).itemsize * 8
            raise NotBrightfieldError(
                f"{name}: {bits}-bit {np.dtype(series.dtype).name} pixels; tilscore reads "
                "8-bit RGB brightfield slides only (convert to 8-bit RGB first)"
            )
        samples = shape[axes.index("S")] if "S" in axes else 1
        channels = shape[axes.index("C")] if "C" in axes else 1
        photometric = int(series.levels[0].keyframe.photometric)
        if channels > 1 or samples == 1:
            count = max(channels, samples)
            kind = "greyscale" if count == 1 else f"{count}-channel (fluorescence/multiplex?)"
            raise NotBrightfieldError(
                f"{name}: {kind} image (axes {axes}); tilscore reads RGB brightfield only"
            )
        if samples not in (3, 4):
            raise NotBrightfieldError(
                f"{name}: {samples} samples per pixel (axes {axes}); tilscore reads RGB "
                "brightfield (3 samples, or 4 with alpha) only"
            )
        if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
            raise NotBrightfieldError(
                f"{name}: TIFF photometric {photometric} with {samples} samples is not RGB; "
                "tilscore reads RGB brightfield only"
            )

    def _check_not_truncated(self, series) -> None:
        """SlideOpenError when tile/strip data point past the end of the file."""
        size = self._tf.filehandle.size
        for level in series.levels:
            for page in level.pages:
                if page is None:
                    continue
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    raise SlideOpenError(
                        f"{self._name}: truncated file (image data runs to byte "
                        f"{int((offsets + counts).max())}, the file has {size})"
                    )

    def _properties(self, keyframe, series_index: int) -> dict[str, str]:
        props: dict[str, str] = {}
        for tag_name in _TIFF_TAGS_AS_PROPERTIES:
            tag = keyframe.tags.get(tag_name)
            if tag is None:
                continue
            value = tag.value
            if tag_name.endswith("Resolution") and isinstance(value, tuple):
                value = value[0] / value[1] if value[1] else 0.0
            elif tag_name == "ResolutionUnit":
                value = RESUNIT_NAMES.get(int(value), str(value))
            props[f"tiff.{tag_name}"] = str(value)
        others = [s for k, s in enumerate(self._tf.series) if k != series_index]
        props["tilscore.associated_images"] = ",".join(
            (s.name or f"series{k}").lower() for k, s in enumerate(others)
        )
        props["tilscore.series"] = str(series_index)
        return props

    def _mpp(self, keyframe, series_index: int) -> float | None:
        tf = self._tf
        if tf.is_ome:
            mpp = _ome_mpp(tf.ome_metadata, series_index)
            if mpp is not None:
                return mpp
        match = _APERIO_MPP.search(tf.pages[0].description or "") if tf.is_svs else None
        if match:
            return float(match.group(1))
        unit = keyframe.tags.get("ResolutionUnit")
        mpps = []
        for tag_name in ("XResolution", "YResolution"):
            tag = keyframe.tags.get(tag_name)
            if tag is None or unit is None:
                return None
            num, den = tag.value
            mpps.append(mpp_from_resolution(num / den if den else 0.0, int(unit.value)))
        if None in mpps:
            return None
        return (mpps[0] + mpps[1]) / 2.0

    # -- reading ----------------------------------------------------------------------
    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) at level pixel (x, y); decodes only touched tiles."""
        index = tuple(
            slice(y, y + height) if a == "Y"
            else slice(x, x + width) if a == "X"
            else slice(None) if a == "S"
            else 0
            for a in self._axes
        )  # fmt: skip
        try:
            data = np.asarray(self._levels[level][index])
        except Exception as exc:
            raise SlideReadError(
                f"{self._name}: cannot decode region at level {level} ({x}, {y}): {one_line(exc)}"
            ) from exc
        data = data.transpose(self._perm)
        if self._ycbcr[level]:
            data = ycbcr_to_rgb(data[..., :3])
        elif data.shape[2] == 4:
            data = composite_on_white(data, premultiplied=self._premultiplied)
        return np.ascontiguousarray(data)

    def close(self) -> None:
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()


def _area(page_series) -> int:
    width, height = _width_height(page_series)
    return width * height


def _width_height(page_series) -> tuple[int, int]:
    """(width, height) of a tifffile series or level from its axes and shape."""
    axes, shape = page_series.axes, page_series.shape
    return int(shape[axes.index("X")]), int(shape[axes.index("Y")])


def _ome_mpp(ome_xml: str | None, series_index: int) -> float | None:
    """Mean of OME PhysicalSizeX/Y (converted to µm) of image `series_index`, or None."""
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        log.warning("unparsable OME-XML; ignoring its pixel size")
        return None
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None
    image = images[min(series_index, len(images) - 1)]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm").strip().lower()
        if value is None or unit not in UNIT_UM:
            return None
        sizes.append(float(value) * UNIT_UM[unit])
    return (sizes[0] + sizes[1]) / 2.0
