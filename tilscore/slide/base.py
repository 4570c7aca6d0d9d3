"""The slide interface: a small backend protocol and the one `Slide` class on top.

Backends (OpenSlide, tifffile+zarr, DICOM, plain image, numpy array) implement only
:class:`Backend`: native pyramid levels and raw in-bounds reads. Everything users
call (reads at an arbitrary µm/px with antialiased resampling, white padding outside
the slide, thumbnails streamed in strips, MPP validation) lives once in
:class:`Slide`, which composes a backend (composition, one level under the interface).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from tilscore.errors import MissingMppError, UsageError

log = logging.getLogger(__name__)

MPP_MIN_UM = 0.05  # µm/px; finer than any optical scanner (40x ≈ 0.25)
MPP_MAX_UM = 20.0  # µm/px; coarser is a thumbnail, not a slide
# Block size (level pixels) used when streaming a thumbnail from a level: bounds memory
# to one block (12 MiB) plus the output, whatever the slide size.
_THUMB_BLOCK_PX = 2048


@runtime_checkable
class Backend(Protocol):
    """What a slide format must provide. Coordinates are integers.

    ``level_dimensions[k]`` is (width, height) of level k (level 0 = full resolution).
    ``metadata_mpp`` is µm/px at level 0 from the file (None when absent).
    ``vendor`` is a short format name (``aperio``, ``generic-tiff``, ``image`` ...).
    ``properties`` is a flat str->str mapping of the file metadata (OpenSlide keys when
    the backend is OpenSlide; ``tilscore.associated_images`` lists label/macro names).
    """

    vendor: str
    properties: Mapping[str, str]
    level_dimensions: tuple[tuple[int, int], ...]
    metadata_mpp: float | None

    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return uint8 RGB (height, width, 3) of `level` with top-left at level pixel (x, y).

        Callers guarantee the region lies inside the level. Raise SlideReadError on decode
        failure.
        """

    def close(self) -> None:
        """Release file handles."""


def mpp_problem(mpp: float) -> str | None:
    """Why `mpp` (µm/px) is not a plausible slide pixel size (None: it is). The one range
    every pixel size is checked against: --mpp, manifest rows, file metadata."""
    if not (math.isfinite(mpp) and MPP_MIN_UM <= mpp <= MPP_MAX_UM):
        return f"is not a plausible pixel size (expected {MPP_MIN_UM:g}–{MPP_MAX_UM:g} µm/px)"
    return None


def validate_mpp(mpp: float, source: str) -> float:
    """Return `mpp` as float, or raise UsageError when outside 0.05–20 µm/px."""
    value = float(mpp)
    if mpp_problem(value):
        raise UsageError(
            f"implausible pixel size {value:g} µm/px from {source} "
            f"(expected {MPP_MIN_UM}–{MPP_MAX_UM}); pass the right value with --mpp"
        )
    return value


def resize_rgb(image: np.ndarray, width: int, *, height: int) -> np.ndarray:
    """Resize uint8 RGB to (height, width, 3): area averaging when shrinking (antialiased),
    bilinear when enlarging."""
    import cv2  # lazy: `import tilscore.slide` loads no OpenCV (test_slide.py)

    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width <= image.shape[1] and height <= image.shape[0]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


class Slide:
    """A whole-slide (or plain) image with reads at any resolution. Use as a context manager.

    Attributes: ``path``, ``dimensions`` (w, h at level 0), ``level_dimensions``,
    ``level_downsamples``, ``vendor``, ``properties``, ``mpp`` (µm/px at level 0; raises
    MissingMppError when unknown), ``mpp_source`` ("metadata", "override" or None).
    """

    def __init__(self, backend: Backend, path: str | Path, mpp: float | None = None):
        self._backend = backend
        self.path = Path(path)
        self.vendor = backend.vendor
        self.properties = dict(backend.properties)
        self.metadata_mpp = backend.metadata_mpp  # as the file says (None when absent)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in backend.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        w0, h0 = self.dimensions
        # Same convention as OpenSlide: the mean of the two axis ratios.
        self.level_downsamples = tuple(
            (w0 / w + h0 / h) / 2.0 for (w, h) in self.level_dimensions
        )
        self._mpp_problem = None  # why metadata gave no usable mpp (for the error message)
        if mpp is not None:
            self._mpp = validate_mpp(mpp, "--mpp")
            self.mpp_source = "override"
        elif backend.metadata_mpp is not None:
            try:
                self._mpp = validate_mpp(backend.metadata_mpp, "the file metadata")
                self.mpp_source = "metadata"
            except UsageError as exc:
                # Implausible metadata (often a 72-dpi default written by image software) is
                # a fact about the file, not a usage error: open it; `mpp` raises later.
                log.warning("%s: %s", self.path.name, exc)
                self._mpp, self.mpp_source, self._mpp_problem = None, None, str(exc)
        else:
            self._mpp = None
            self.mpp_source = None

    # -- metadata ---------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """µm per pixel at level 0."""
        if self._mpp is None:
            if self._mpp_problem:
                raise MissingMppError(f"{self.path.name}: {self._mpp_problem}")
            raise MissingMppError(
                f"{self.path.name}: no pixel size (µm/px) in the file metadata; "
                "give it with --mpp (e.g. --mpp 0.25 for 40x, 0.5 for 20x)"
            )
        return self._mpp

    @property
    def associated_images(self) -> tuple[str, ...]:
        names = self.properties.get("tilscore.associated_images", "")
        return tuple(n for n in names.split(",") if n)

    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample does not exceed `downsample`."""
        best = 0
        for k, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = k
        return best

    # -- pixels -----------------------------------------------------------------------
    def read(
        self, x: int, y: int, *, width: int, height: int, mpp: float | None = None
    ) -> np.ndarray:
        """Read a region as uint8 RGB (height, width, 3).

        (x, y) is the top-left in level-0 pixels; width/height are output pixels at `mpp`
        µm/px (default: level 0). The region comes from the best pyramid level and is
        resampled with area averaging; parts outside the slide are white.
        """
        if width <= 0 or height <= 0:
            raise UsageError(f"read size must be positive, got {width}x{height}")
        downsample = 1.0 if mpp is None else float(mpp) / self.mpp
        level = self.best_level(downsample)
        level_ds = self.level_downsamples[level]
        # Region in level pixels (rounded: at most half a level pixel of offset).
        lx0 = int(round(x / level_ds))
        ly0 = int(round(y / level_ds))
        lw = max(1, int(round(width * downsample / level_ds)))
        lh = max(1, int(round(height * downsample / level_ds)))
        region = self._read_level_padded(level, lx0, ly0, lw, lh)
        return resize_rgb(region, width, height=height)

    def _read_level_padded(self, level: int, lx: int, ly: int, lw: int, lh: int) -> np.ndarray:
        """Read level pixels [lx, lx+lw) x [ly, ly+lh), padding outside with white."""
        level_w, level_h = self.level_dimensions[level]
        ix0, iy0 = max(lx, 0), max(ly, 0)
        ix1, iy1 = min(lx + lw, level_w), min(ly + lh, level_h)
        if ix0 == lx and iy0 == ly and ix1 == lx + lw and iy1 == ly + lh:
            return self._backend.read_level(level, x=lx, y=ly, width=lw, height=lh)
        out = np.full((lh, lw, 3), 255, dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            inner = self._backend.read_level(
                level, x=ix0, y=iy0, width=ix1 - ix0, height=iy1 - iy0
            )
            out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx] = inner
        return out

    def thumbnail_size(self, mpp: float) -> tuple[int, int]:
        """(w, h) px of :meth:`thumbnail` at `mpp`: the slide size / (mpp / slide mpp),
        rounded (at least 1)."""
        downsample = float(mpp) / self.mpp
        w0, h0 = self.dimensions
        return max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample)))

    def thumbnail_mpp(self, mpp: float) -> float:
        """The µm per pixel that :meth:`thumbnail` at `mpp` really has: its size is rounded,
        so on a small image it differs from `mpp` (a 1000 px image at 0.5 µm/px is 62 px
        at 8 µm/px: 8.06 µm/px). The geometric mean of the two axes."""
        w, h = self.thumbnail_size(mpp)
        w0, h0 = self.dimensions
        return float(self.mpp * ((w0 / w) * (h0 / h)) ** 0.5)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at `mpp` µm/px as uint8 RGB.

        Streamed in blocks from the best level, so memory is bounded by the output plus one
        block (``_THUMB_BLOCK_PX``² level pixels) whatever the slide size.
        """
        downsample = float(mpp) / self.mpp
        out_w, out_h = self.thumbnail_size(mpp)
        level = self.best_level(downsample)
        level_w, level_h = self.level_dimensions[level]
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        x_edges = _block_edges(level_w, out_w)
        y_edges = _block_edges(level_h, out_h)
        for (ly0, ly1), (oy0, oy1) in y_edges:
            for (lx0, lx1), (ox0, ox1) in x_edges:
                block = self._backend.read_level(
                    level, x=lx0, y=ly0, width=lx1 - lx0, height=ly1 - ly0
                )
                out[oy0:oy1, ox0:ox1] = resize_rgb(block, ox1 - ox0, height=oy1 - oy0)
        return out

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.path.name!r}, vendor={self.vendor!r}, dimensions={self.dimensions}, "
            f"levels={len(self.level_dimensions)}, mpp={self._mpp})"
        )


def _block_edges(level_px: int, out_px: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Split [0, level_px) into blocks and map each to its output range [o0, o1).

    Output edges are rounded level edges scaled to `out_px`, so blocks tile the output
    exactly; blocks that map to no output pixel are dropped.
    """
    scale = out_px / level_px
    edges = []
    for l0 in range(0, level_px, _THUMB_BLOCK_PX):
        l1 = min(l0 + _THUMB_BLOCK_PX, level_px)
        o0 = int(round(l0 * scale))
        o1 = out_px if l1 == level_px else int(round(l1 * scale))
        if o1 > o0:
            edges.append(((l0, l1), (o0, o1)))
    return edges
