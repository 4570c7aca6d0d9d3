"""DICOM WSI read frame by frame with pydicom: the fallback when neither OpenSlide nor
wsidicom opens a file.

Real files in the wild break the readers' assumptions: a single-file sparse-tiled
pyramid level (``TILED_SPARSE``) without ``ImageType`` and without a top-level pixel
spacing, whose tile positions are only in the per-frame functional groups
(``PerFrameFunctionalGroupsSequence`` → ``PlanePositionSlideSequence`` →
``Row/ColumnPositionInTotalImagePixelMatrix``, 1-based) and whose pixel spacing is in the
shared functional groups (``SharedFunctionalGroupsSequence`` → ``PixelMeasuresSequence``).
OpenSlide needs ``ImageType`` to find the "flavor", wsidicom to find the levels.

This reader needs only what places the tiles: ``TotalPixelMatrixColumns/Rows``,
``Rows``/``Columns`` (the tile size), ``NumberOfFrames`` and, for ``TILED_SPARSE``, the
per-frame positions (``TILED_FULL`` frames are row-major). Each file of the series with a
total pixel matrix is a pyramid level (finest first; files whose aspect ratio differs from
the finest, such as a label or overview, are left out). At open it indexes where each
frame's bytes lie in the file (the encapsulated item headers, or the fixed frame size of
native pixel data); a read decodes only the frames the region touches (imagecodecs: JPEG,
JPEG 2000 / HTJ2K; or native 8-bit). Tiles absent from a sparse level are white. Only the
first focal plane and optical path are read.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np

from tilscore.errors import SlideOpenError, SlideReadError
from tilscore.slide.common import one_line

log = logging.getLogger(__name__)

_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_JPEG = {"1.2.840.10008.1.2.4.50"}  # baseline 8-bit
_JPEG2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
           "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}  # J2K, HTJ2K
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_ITEM, _SEQ_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000), (FFFE,E0DD) as little-endian uint32


@dataclass
class _Level:
    """One pyramid level: a DICOM instance whose frames tile a total pixel matrix."""

    path: Path
    size: tuple[int, int]  # (width, height) px
    tile: tuple[int, int]  # (width, height) px of a frame
    frames: dict[tuple[int, int], int]  # (tile row, tile col) -> frame index
    spans: list[tuple[tuple[int, int], ...]]  # frame -> its (file offset, length) pieces
    transfer_syntax: str
    photometric: str
    planar: int
    spacing_mm: tuple[float, float] | None  # (row, column) spacing


class DicomFrameBackend:
    """DICOM WSI levels read frame by frame with pydicom (see the module docstring).

    ``vendor`` is "dicom"; ``metadata_mpp`` the mean pixel spacing of level 0 in µm, or
    None when the file has none; ``properties`` hold ``dicom.<Keyword>`` header values.
    """

    vendor = "dicom"

    def __init__(self, path: str | Path, files: list[Path] | None = None,
                 properties: dict[str, str] | None = None):
        self._path = Path(path)
        name = self._path.name
        levels, first_error = [], None
        for f in files or [self._path]:
            try:
                levels.append(_read_level(f))
            except SlideOpenError as exc:
                if f == self._path:
                    raise
                first_error = first_error or exc  # a sibling that is no level (label, ...)
                log.debug("%s: not a pyramid level: %s", f.name, exc)
        levels.sort(key=lambda lv: -lv.size[0] * lv.size[1])
        w0, h0 = levels[0].size
        self._levels = [lv for lv in levels
                        if abs(lv.size[0] / lv.size[1] / (w0 / h0) - 1) < 0.02]
        self.level_dimensions = tuple(lv.size for lv in self._levels)
        spacing = self._levels[0].spacing_mm
        self.metadata_mpp = (spacing[0] + spacing[1]) / 2 * 1000 if spacing else None
        self.properties = dict(properties or {})
        self.properties["tilscore.associated_images"] = ""
        self._fds = {lv.path: os.open(lv.path, os.O_RDONLY) for lv in self._levels}
        log.debug("%s: pydicom frame reader, levels %s", name, self.level_dimensions)

    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) of `level` at level pixel (x, y): only the frames
        the region touches are read and decoded; absent frames are white."""
        lv = self._levels[level]
        tw, th = lv.tile
        out = np.full((height, width, 3), 255, np.uint8)
        for row in range(y // th, (y + height - 1) // th + 1):
            for col in range(x // tw, (x + width - 1) // tw + 1):
                frame = lv.frames.get((row, col))
                if frame is None:
                    continue
                tile = self._decode(lv, frame)
                # the part of this tile inside the region, in tile and in output pixels
                tx0, ty0 = max(x - col * tw, 0), max(y - row * th, 0)
                tx1 = min(x + width - col * tw, tw, tile.shape[1])
                ty1 = min(y + height - row * th, th, tile.shape[0])
                if tx1 > tx0 and ty1 > ty0:
                    ox, oy = col * tw + tx0 - x, row * th + ty0 - y
                    out[oy:oy + ty1 - ty0, ox:ox + tx1 - tx0] = tile[ty0:ty1, tx0:tx1]
        return out

    def _decode(self, lv: _Level, frame: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of one frame."""
        fd = self._fds[lv.path]
        try:
            data = b"".join(os.pread(fd, length, offset) for offset, length in lv.spans[frame])
            return _decode_frame(data, lv)
        except Exception as exc:
            raise SlideReadError(f"{lv.path.name}: cannot decode frame {frame + 1}: "
                                 f"{one_line(exc)}") from exc

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _decode_frame(data: bytes, lv: _Level) -> np.ndarray:
    tw, th = lv.tile
    ts = lv.transfer_syntax
    if ts in _NATIVE:
        if lv.planar:
            arr = np.frombuffer(data, np.uint8, 3 * th * tw).reshape(3, th, tw).transpose(1, 2, 0)
        else:
            arr = np.frombuffer(data, np.uint8, 3 * th * tw).reshape(th, tw, 3)
        if lv.photometric.startswith("YBR_FULL"):
            from pydicom.pixels import convert_color_space  # optional dependency (the dicom extra)

            arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif ts in _JPEG:
        # An "RGB" JPEG holds RGB components (no colour transform); YBR_* hold YCbCr.
        rgb = lv.photometric == "RGB"
        arr = imagecodecs.jpeg8_decode(data, colorspace=2 if rgb else None, outcolorspace=2)
    else:
        arr = imagecodecs.jpeg2k_decode(data)
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"frame decoded to shape {arr.shape}, expected RGB")
    return arr


def _read_level(path: Path) -> _Level:
    """Header and frame index of one DICOM instance; SlideOpenError naming what lacks."""
    import pydicom  # optional dependency (the dicom extra)

    name = path.name
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_offset = fp.tell()
    except Exception as exc:
        raise SlideOpenError(f"{name}: not a readable DICOM file ({one_line(exc)})") from exc
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts not in _NATIVE | _JPEG | _JPEG2K:
        raise SlideOpenError(f"{name}: DICOM transfer syntax {ts or 'missing'} is not "
                             "supported (native, JPEG baseline, JPEG 2000, HTJ2K)")
    for keyword in ("TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Rows", "Columns"):
        if not ds.get(keyword):
            raise SlideOpenError(f"{name}: DICOM WSI without {keyword}: cannot place its "
                                 "tiles")
    size = (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
    tile = (int(ds.Columns), int(ds.Rows))
    n_frames = int(ds.get("NumberOfFrames") or 1)
    grid = (-(-size[1] // tile[1]), -(-size[0] // tile[0]))  # tile rows, tile columns
    organisation = str(ds.get("DimensionOrganizationType", "")).upper()
    if organisation == "TILED_FULL":
        n = min(n_frames, grid[0] * grid[1])  # the first focal plane and optical path
        frames = {(k // grid[1], k % grid[1]): k for k in range(n)}
    else:
        frames = _sparse_positions(ds, name, tile, grid, n_frames)
    spans = _frame_spans(path, pixel_offset, ts, n_frames, tile, ds)
    return _Level(path, size, tile, frames, spans, ts,
                  str(ds.get("PhotometricInterpretation", "RGB")),
                  int(ds.get("PlanarConfiguration", 0) or 0), _spacing_mm(ds, size))


def _sparse_positions(ds, name: str, tile: tuple[int, int], grid: tuple[int, int],
                      n_frames: int) -> dict[tuple[int, int], int]:
    """(tile row, tile col) -> frame from the per-frame plane positions (first focal plane
    and optical path; positions are 1-based pixels of the total pixel matrix)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) < n_frames:
        raise SlideOpenError(f"{name}: sparse-tiled DICOM without "
                             "PerFrameFunctionalGroupsSequence (one item per frame): "
                             "cannot place its tiles")
    frames: dict[tuple[int, int], int] = {}
    first_plane = None
    for k in range(n_frames):
        item = per_frame[k]
        pos = item.get("PlanePositionSlideSequence")
        if not pos or "ColumnPositionInTotalImagePixelMatrix" not in pos[0] \
                or "RowPositionInTotalImagePixelMatrix" not in pos[0]:
            raise SlideOpenError(
                f"{name}: frame {k + 1} has no PlanePositionSlideSequence with "
                "Column/RowPositionInTotalImagePixelMatrix: cannot place its tile")
        optical = item.get("OpticalPathIdentificationSequence")
        plane = (pos[0].get("ZOffsetInSlideCoordinateSystem"),
                 optical[0].get("OpticalPathIdentifier") if optical else None)
        first_plane = plane if first_plane is None else first_plane
        if plane != first_plane:
            continue
        col = (int(pos[0].ColumnPositionInTotalImagePixelMatrix) - 1) // tile[0]
        row = (int(pos[0].RowPositionInTotalImagePixelMatrix) - 1) // tile[1]
        if 0 <= row < grid[0] and 0 <= col < grid[1]:
            frames.setdefault((row, col), k)
    return frames


def _spacing_mm(ds, size: tuple[int, int]) -> tuple[float, float] | None:
    """(row, column) pixel spacing in mm: shared functional groups, then the first frame's,
    then a top-level PixelSpacing, then the imaged volume / pixel matrix; None if none."""
    sources = []
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq)
        if groups:
            measures = groups[0].get("PixelMeasuresSequence")
            if measures:
                sources.append(measures[0].get("PixelSpacing"))
    sources.append(ds.get("PixelSpacing"))
    for spacing in sources:
        try:
            values = (float(spacing[0]), float(spacing[1]))
        except (TypeError, ValueError, IndexError):
            continue
        if all(v > 0 for v in values):
            return values
    try:
        values = (float(ds.ImagedVolumeHeight) / size[1], float(ds.ImagedVolumeWidth) / size[0])
    except (AttributeError, TypeError, ValueError):
        return None
    return values if all(v > 0 for v in values) else None


def _frame_spans(path: Path, offset: int, ts: str, n_frames: int, tile: tuple[int, int],
                 ds) -> list[tuple[tuple[int, int], ...]]:
    """The (file offset, byte length) pieces of each frame's bytes (one, or a frame's
    fragments), reading only element and item headers. `offset`: where the Pixel Data
    element starts."""
    name = path.name
    if int(ds.get("BitsAllocated", 8) or 8) != 8 or int(ds.get("SamplesPerPixel", 3) or 3) != 3:
        raise SlideOpenError(f"{name}: DICOM frames are not 8-bit RGB")
    implicit = ts == "1.2.840.10008.1.2"
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(8 if implicit else 12)
        if head[:4] != _PIXEL_DATA_TAG:
            raise SlideOpenError(f"{name}: DICOM file without PixelData")
        length = struct.unpack("<I", head[4:8] if implicit else head[8:12])[0]
        start = offset + len(head)
        if ts in _NATIVE:
            frame_bytes = tile[0] * tile[1] * 3
            if length < frame_bytes * n_frames:
                raise SlideOpenError(f"{name}: PixelData holds {length} bytes, "
                                     f"{n_frames} frames need {frame_bytes * n_frames}")
            return [((start + k * frame_bytes, frame_bytes),) for k in range(n_frames)]
        fragments = []  # (offset, length) of each item; the first is the offset table
        pos = start
        while True:
            fh.seek(pos)
            item = fh.read(8)
            if len(item) < 8:
                raise SlideOpenError(f"{name}: encapsulated PixelData is truncated")
            tag, size = struct.unpack("<II", item)
            if tag == _SEQ_END:
                break
            if tag != _ITEM:
                raise SlideOpenError(f"{name}: encapsulated PixelData has a bad item tag")
            fragments.append((pos + 8, size))
            pos += 8 + size
    table, data = fragments[0], fragments[1:]
    if len(data) == n_frames:
        return [(f,) for f in data]
    if data and table[1] >= 4 * n_frames:  # basic offset table: item offset of each frame
        with open(path, "rb") as fh:
            fh.seek(table[0])
            starts = struct.unpack(f"<{n_frames}I", fh.read(4 * n_frames))
        first = data[0][0] - 8  # offsets count from the first fragment's item tag
        ends = [*starts[1:], data[-1][0] + data[-1][1] - first]
        return [tuple(f for f in data if s <= f[0] - 8 - first < e)
                for s, e in zip(starts, ends, strict=True)]
    raise SlideOpenError(f"{name}: {len(data)} fragments for {n_frames} frames and no "
                         "basic offset table: cannot find each frame")
