"""DICOM whole-slide backend (VL Whole Slide Microscopy): wsidicom, else pydicom frames.

Auto dispatch prefers OpenSlide for DICOM it can open; :func:`open_dicom` covers the rest
and ``backend="dicom"``: wsidicom first (:class:`DicomBackend`), then, for files wsidicom
refuses (e.g. a single-file sparse-tiled level without ``ImageType``), the plain pydicom
frame reader :class:`~tilscore.slide.dicom_frames.DicomFrameBackend`. Needs the ``dicom``
extra (``pip install 'tilscore[dicom]'``: wsidicom + pydicom). A DICOM WSI is one file per
pyramid level: given one ``.dcm`` file, its siblings in the same folder with the same
SeriesInstanceUID are opened with it (as OpenSlide does).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tilscore.errors import NotBrightfieldError, SlideOpenError, SlideReadError
from tilscore.slide.common import composite_on_white, one_line
from tilscore.slide.dicom_frames import DicomFrameBackend

log = logging.getLogger(__name__)

# Upper bound on sibling files whose header is read when looking for the other levels.
_MAX_SIBLINGS = 2000
_HEADER_TAGS = ["SeriesInstanceUID", "SOPClassUID"]
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_PROPERTY_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "ContainerIdentifier", "PhotometricInterpretation",
)  # fmt: skip


def open_dicom(path: str | Path):
    """A backend for the DICOM WSI at `path`: :class:`DicomBackend` (wsidicom) when it opens
    the series, else the pydicom frame reader; SlideOpenError (naming the DICOM attribute
    that is missing, where that is the reason) when neither can read it."""
    path = Path(path)
    name = path.name
    try:
        import pydicom  # noqa: F401  optional dependency (the dicom extra); every reader needs it
    except ImportError as exc:
        raise SlideOpenError(f"{name}: reading DICOM WSI without OpenSlide needs pydicom: "
                             "pip install 'tilscore[dicom]'") from exc
    header = _wsi_header(path)
    files = _series_files(path, header.get("SeriesInstanceUID"))
    try:
        return DicomBackend(path, header, files)
    except (SlideOpenError, ImportError) as exc:
        log.debug("%s: wsidicom did not open it (%s); reading its frames with pydicom",
                  name, exc)

    return DicomFrameBackend(path, files, _properties(header))


def _wsi_header(path: Path):
    """The header of a VL Whole Slide Microscopy file (SlideOpenError otherwise;
    NotBrightfieldError unless 8-bit RGB)."""
    import pydicom  # optional dependency (the dicom extra)

    name = path.name
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise SlideOpenError(f"{name}: not a readable DICOM file ({one_line(exc)})") from exc
    sop_class = str(header.get("SOPClassUID", ""))
    if sop_class != _WSI_SOP_CLASS:
        raise SlideOpenError(
            f"{name}: DICOM file is not a whole-slide image (SOP class {sop_class or 'none'})"
        )
    _check_brightfield(header, name)
    return header


def _properties(header) -> dict[str, str]:
    return {f"dicom.{kw}": str(header.get(kw)) for kw in _PROPERTY_KEYWORDS if kw in header}


class DicomBackend:
    """A DICOM WSI pyramid read with wsidicom (levels = the volume pyramid, finest first).

    ``metadata_mpp`` is the mean pixel spacing of level 0 in µm (DICOM PixelSpacing is in
    mm); ``vendor`` is "dicom"; ``properties`` hold ``dicom.<Keyword>`` header values.
    """

    vendor = "dicom"

    def __init__(self, path: str | Path, header, files: list[Path]):
        """`header`: the file's pydicom header (checked by :func:`_wsi_header`); `files`:
        the series' files. ImportError when wsidicom is not installed."""
        import wsidicom  # optional dependency (the dicom extra)

        self._path = Path(path)
        name = self._path.name
        try:
            self._wsi = wsidicom.WsiDicom.open(files)
            levels = [self._wsi.levels[k] for k in range(len(self._wsi.levels))]
        except Exception as exc:
            raise SlideOpenError(f"{name}: wsidicom cannot open it ({one_line(exc)})") from exc
        if not levels:
            self._wsi.close()
            raise SlideOpenError(f"{name}: DICOM file holds no whole-slide pyramid level")
        self._pyramid_levels = [lv.level for lv in levels]
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self.metadata_mpp = _mpp(self._wsi)
        self.properties = _properties(header)
        associated = [
            n
            for n, attr in (("label", "labels"), ("macro", "overviews"))
            if getattr(self._wsi, attr, None)
        ]
        self.properties["tilscore.associated_images"] = ",".join(associated)
        log.debug("%s: %d DICOM files, levels %s", name, len(files), self.level_dimensions)

    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) of `level` at level pixel (x, y)."""
        try:
            data = self._wsi.read_region(
                (x, y), self._pyramid_levels[level], (width, height), as_array=True
            )
        except Exception as exc:
            raise SlideReadError(
                f"{self._path.name}: cannot decode region at level {level} ({x}, {y}): "
                f"{one_line(exc)}"
            ) from exc
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim == 3 and data.shape[2] == 4:
            return composite_on_white(data)
        if data.shape != (height, width, 3):
            raise SlideReadError(
                f"{self._path.name}: DICOM region has shape {data.shape}, expected RGB"
            )
        return np.ascontiguousarray(data)

    def close(self) -> None:
        self._wsi.close()


def _check_brightfield(header, name: str) -> None:
    """NotBrightfieldError unless 8-bit, 3 samples per pixel (RGB or YBR)."""
    samples = int(header.get("SamplesPerPixel", 0) or 0)
    bits = int(header.get("BitsAllocated", 8) or 8)
    photometric = str(header.get("PhotometricInterpretation", ""))
    if bits != 8:
        raise NotBrightfieldError(
            f"{name}: {bits}-bit DICOM pixels; tilscore reads 8-bit RGB brightfield only"
        )
    if samples != 3 or photometric.startswith("MONOCHROME"):
        raise NotBrightfieldError(
            f"{name}: DICOM {photometric or 'image'} with {samples} sample(s) per pixel "
            "(fluorescence?); tilscore reads RGB brightfield only"
        )


def _series_files(path: Path, series_uid) -> list[Path]:
    """`path` plus same-folder files with the same suffix and SeriesInstanceUID."""
    import pydicom  # optional dependency (the dicom extra)

    if series_uid is None:
        return [path]
    files = [path]
    suffix = path.suffix.lower()
    candidates = sorted(
        p for p in path.parent.iterdir()
        if p.is_file() and p.suffix.lower() == suffix and p != path
    )  # fmt: skip
    if len(candidates) > _MAX_SIBLINGS:
        log.warning(
            "%s: %d sibling files; looking at the first %d for other levels",
            path.name,
            len(candidates),
            _MAX_SIBLINGS,
        )
    for sibling in candidates[:_MAX_SIBLINGS]:
        try:
            ds = pydicom.dcmread(sibling, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except Exception:
            continue
        if ds.get("SeriesInstanceUID") == series_uid:
            files.append(sibling)
    return files


def _mpp(wsi) -> float | None:
    """µm/px of the base level from wsidicom (mean of x and y), or None."""
    try:
        mpp = wsi.mpp
        values = [float(mpp.width), float(mpp.height)]
    except Exception:
        return None
    if not all(v > 0 for v in values):
        return None
    return (values[0] + values[1]) / 2.0
