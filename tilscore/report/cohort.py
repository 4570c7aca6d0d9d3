"""``tilscore report``: one self-contained HTML page summarising a scored output folder.

:func:`write_report` reads ``DIR/<slide_id>/summary.json`` (the source of truth;
``scores.csv`` is derived from them), ``maps.zarr`` and ``overlay.png`` of each slide and
``DIR/failures.csv``, and writes ``DIR/report.html`` atomically: header (versions, model,
config hashes, counts), sortable cohort table, distributions split by an optional
``group_by`` column, one section per slide, failed and incomplete slides. Images are
embedded as ``data:`` URIs, so the page needs no network and no other file; only the
"files" links point (relatively) into the slide folders.

A slide folder is one holding ``summary.json`` or any other tilscore output; without a
readable ``summary.json`` it is shown as incomplete, never an error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from tilscore import __version__
from tilscore.errors import UsageError
from tilscore.io import atomic
from tilscore.io.ome_zarr import LABELS_NAME
from tilscore.report.html import render_report
from tilscore.report.plots import density_rgba, image_data_uri, labels_rgba
from tilscore.report.study import run_study
from tilscore.report.types import METADATA_PREFIX, Cohort, SlideEntry, SlideMaps
from tilscore.summary import OUTPUT_FILES, SummaryProblem, read_summary

log = logging.getLogger(__name__)

IMAGE_LONG_SIDE_PX = 800  # embedded maps: at most this many px on the long side
OVERLAY_LONG_SIDE_PX = 640  # overlay JPEG: ~80 kB, so a slide costs ~90 kB of report
DENSITY_MIN_SIDE_PX = 320  # coarse density grids are enlarged (nearest) to about this
DENSITY_PERCENTILE = 99  # colour scale top: robust to a few crowded grid cells


def load_cohort(out_dir: str | Path) -> Cohort:
    """Read every slide folder and failures.csv of `out_dir` (UsageError if it is missing)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: no such folder")
    cohort = Cohort(out_dir)
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()
                         and not p.name.startswith(".")):
        if not any((folder / name).exists() for name in OUTPUT_FILES):
            continue  # not a slide output folder (e.g. the input slides)
        entry = _read_entry(folder)
        (cohort.scored if entry.summary is not None else cohort.incomplete).append(entry)
    cohort.failures = _read_failures(out_dir / "failures.csv")
    return cohort


def _read_entry(folder: Path) -> SlideEntry:
    """A slide folder; one whose summary.json is missing or malformed is incomplete."""
    try:
        summary = read_summary(folder / "summary.json")
    except FileNotFoundError:
        return SlideEntry(folder.name, folder, None, "no summary.json (scoring did not finish)")
    except (OSError, SummaryProblem) as exc:
        return SlideEntry(folder.name, folder, None, str(exc))
    return SlideEntry(summary["slide"] or folder.name, folder, summary)


def _read_failures(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: atomic.read_csv_value(r.get(k) or "") for k in ("input", "error")}
                    for r in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        if path.exists():
            log.warning("unreadable %s: %s", path, exc)
        return []


def resolve_group_column(cohort: Cohort, group_by: str) -> str:
    """The scores.csv column named by `group_by`: a column itself, or a metadata column
    given without its ``metadata.`` prefix. UsageError listing the choices otherwise."""
    columns = cohort.columns()
    for key in (group_by, METADATA_PREFIX + group_by):
        if key in columns:
            return key
    meta = [c[len(METADATA_PREFIX):] for c in cohort.metadata_columns()]
    other = [c for c in columns if not c.startswith(METADATA_PREFIX)]
    raise UsageError(f"unknown --group-by column {group_by!r}; metadata columns: "
                     f"{', '.join(meta) or 'none'}; scores.csv columns: {', '.join(other)}")


def render_slide_maps(folder: Path, max_px: int = IMAGE_LONG_SIDE_PX) -> SlideMaps:
    """Overlay, region map and density heatmap of a slide folder as embedded images."""
    maps = SlideMaps()
    overlay = folder / "overlay.png"
    if overlay.exists():
        try:
            with Image.open(overlay) as im:
                side = min(max_px, OVERLAY_LONG_SIDE_PX)
                maps.overlay_uri = image_data_uri(np.asarray(im.convert("RGB")), side, fmt="JPEG")
        except (OSError, ValueError) as exc:
            maps.problem.append(f"overlay.png unreadable: {exc}")
    else:
        maps.problem.append("no overlay.png")
    if not (folder / "maps.zarr").exists():
        maps.problem.append("no maps.zarr")
        return maps
    try:
        _render_zarr(folder / "maps.zarr", maps, max_px)
    except Exception as exc:  # a damaged map must not stop the report
        log.debug("maps of %s", folder, exc_info=True)
        maps.problem.append(f"maps.zarr unreadable: {type(exc).__name__}: {exc}")
    return maps


def _render_zarr(path: Path, maps: SlideMaps, max_px: int) -> None:
    """Region map and density map, both cropped to the same box around the tissue (the
    maps cover whole tiles, often well beyond the slide's tissue). The density map is the
    root image of ``maps.zarr``, the regions its label image ``labels/regions``."""
    root = zarr.open_group(str(path), mode="r")
    regions = root[f"labels/{LABELS_NAME}"]
    ome = regions.attrs["ome"]
    labels, labels_mpp = _level_at_most(regions, ome, max_px)
    info = ome.get("image-label", {})
    colors = {int(c["label-value"]): tuple(c["rgba"]) for c in info.get("colors", [])}
    names = {int(p["label-value"]): p.get("class", str(p["label-value"]))
             for p in info.get("properties", [])}
    present = set(np.unique(labels).tolist())  # no legend entry for a class not on the map
    maps.legend = [(names.get(code, str(code)), rgba) for code, rgba in sorted(colors.items())
                   if code != 0 and code in present]
    box_um = _tissue_box_um(labels, labels_mpp)

    image = root.attrs["ome"]["multiscales"][0]
    name = image.get("name") or "density"
    density, d_mpp = _level_at_most(root, root.attrs["ome"], max_px, level=0)
    # Tissue = a region code > 0 at the density cell's centre (glass is transparent).
    rows = ((np.arange(density.shape[0]) + 0.5) * d_mpp / labels_mpp).astype(int)
    cols = ((np.arange(density.shape[1]) + 0.5) * d_mpp / labels_mpp).astype(int)
    tissue = labels[np.clip(rows, 0, labels.shape[0] - 1)][:, np.clip(
        cols, 0, labels.shape[1] - 1)] > 0
    # Snap the box outwards to density cells, so both maps show the same area.
    y0, y1, x0, x1 = (int(np.floor(box_um[0] / d_mpp)), int(np.ceil(box_um[1] / d_mpp)),
                      int(np.floor(box_um[2] / d_mpp)), int(np.ceil(box_um[3] / d_mpp)))
    box_um = (y0 * d_mpp, y1 * d_mpp, x0 * d_mpp, x1 * d_mpp)
    density, tissue = density[y0:y1, x0:x1], tissue[y0:y1, x0:x1]
    finite = density[np.isfinite(density) & tissue]
    vmax = float(np.percentile(finite, DENSITY_PERCENTILE)) if finite.size else 0.0
    maps.density_vmax = vmax if vmax > 0 else 1.0
    if density.size:
        maps.density_uri = image_data_uri(density_rgba(density, maps.density_vmax, tissue=tissue),
                                          max_px, min_long_side_px=DENSITY_MIN_SIDE_PX)
    maps.density_title = ("TIL density" if name == "til_density"
                          else name.replace("_", " ").removesuffix(" density") + " density")
    maps.density_unit = "cells per mm² of tissue"
    r0, r1 = int(box_um[0] // labels_mpp), int(np.ceil(box_um[1] / labels_mpp))
    c0, c1 = int(box_um[2] // labels_mpp), int(np.ceil(box_um[3] / labels_mpp))
    crop = labels[r0:r1, c0:c1]
    if crop.size:
        maps.regions_uri = image_data_uri(labels_rgba(crop, colors), max_px)


def _tissue_box_um(labels: np.ndarray, mpp: float, margin_frac: float = 0.03
                   ) -> tuple[float, float, float, float]:
    """(y0, y1, x0, x1) µm of the box around labels > 0 plus a margin (whole map if none)."""
    h, w = labels.shape
    rows, cols = np.flatnonzero((labels > 0).any(1)), np.flatnonzero((labels > 0).any(0))
    if not rows.size:
        return 0.0, h * mpp, 0.0, w * mpp
    pad = max(1, round(margin_frac * max(h, w)))
    return (max(0, rows[0] - pad) * mpp, min(h, rows[-1] + 1 + pad) * mpp,
            max(0, cols[0] - pad) * mpp, min(w, cols[-1] + 1 + pad) * mpp)


def _level_at_most(group, ome: dict, max_px: int, level: int | None = None
                   ) -> tuple[np.ndarray, float]:
    """(array, µm/px) of the finest pyramid level whose long side is ≤ `max_px` (else the
    coarsest level, strided down to it); `level` forces one level."""
    datasets = ome["multiscales"][0]["datasets"]
    chosen = datasets[-1] if level is None else datasets[level]
    if level is None:
        for ds in datasets:
            if max(group[ds["path"]].shape) <= max_px:
                chosen = ds
                break
    scale = next(t["scale"] for t in chosen["coordinateTransformations"] if t["type"] == "scale")
    arr = group[chosen["path"]]
    step = max(1, int(np.ceil(max(arr.shape) / max_px))) if level is None else 1
    return np.asarray(arr[::step, ::step]) if step > 1 else np.asarray(arr[...]), \
        float(scale[-1]) * step


def build_report(out_dir: str | Path, *, group_by: str | None = None,
                 report_dir: Path | None = None, study=None) -> str:
    """The report HTML for `out_dir`; links are relative to `report_dir` (default
    `out_dir`). UsageError when no slide is scored or `group_by` is unknown. `study`
    (a :class:`tilscore.report.survival.StudyOptions`): add the study statistics section and
    write ``cohort_stats.csv``."""
    cohort = load_cohort(out_dir)
    if not cohort.scored:
        raise UsageError(f"no scored slides in {cohort.out_dir} (no <slide>/summary.json); "
                         "run `tilscore score ... --out DIR` first")
    column = resolve_group_column(cohort, group_by) if group_by else None
    study_html = ""
    if study is not None:  # before the maps: bad survival input fails fast
        study_html = run_study(cohort.out_dir, [e.summary for e in cohort.scored],
                               group_column=column, opts=study)
    cache = MapsCache(cohort.out_dir / MAPS_CACHE_DIR)
    maps = {e.folder.name: cache.get(e.folder) for e in cohort.scored}
    cache.prune(keep={e.folder.name for e in cohort.scored})
    return render_report(cohort, group_column=column, maps=maps,
                         report_dir=Path(report_dir or cohort.out_dir),
                         study_html=study_html)


MAPS_CACHE_DIR = ".report-cache"  # in the output folder: one JSON of SlideMaps per slide
RENDER_VERSION = 2  # bump when rendering changes (2: maps.zarr as image + labels; legends)


class MapsCache:
    """Rendered :class:`SlideMaps` kept between reports (rendering is ~0.3 s per slide,
    the report's whole cost; a cohort of hundreds of slides is re-reported after each
    batch). An entry is valid while the slide's ``summary.json`` is byte-identical
    (rescoring rewrites it, with new timings) and the renderer's settings and tilscore
    version are the same. A missing, stale or unreadable entry is rendered again; a cache
    that cannot be written is skipped (the report does not depend on it)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _key(self, slide_folder: Path) -> str:
        h = hashlib.sha256((slide_folder / "summary.json").read_bytes())
        h.update(f"{__version__}|{RENDER_VERSION}|{IMAGE_LONG_SIDE_PX}|{OVERLAY_LONG_SIDE_PX}|"
                 f"{DENSITY_MIN_SIDE_PX}|{DENSITY_PERCENTILE}".encode())
        return h.hexdigest()

    def get(self, slide_folder: Path) -> SlideMaps:
        key = self._key(slide_folder)
        path = self.folder / f"{slide_folder.name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") == key:
                maps = SlideMaps(**data["maps"])
                maps.legend = [(name, tuple(rgba)) for name, rgba in maps.legend]
                return maps
        except (OSError, ValueError, TypeError, KeyError):
            pass  # absent or unreadable: render
        maps = render_slide_maps(slide_folder)
        if not maps.problem:  # a damaged slide folder is rendered afresh each time
            try:
                self.folder.mkdir(exist_ok=True)
                atomic.write_text(path, json.dumps({"key": key, "maps": asdict(maps)}))
            except OSError as exc:
                log.debug("report cache not written: %s", exc)
        return maps

    def prune(self, keep: set[str]) -> None:
        """Remove entries of slides no longer in the output folder."""
        for path in self.folder.glob("*.json"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)


def write_report(out_dir: Path, *, group_by: str | None = None, path: Path | None = None,
                 study=None) -> Path:
    """Write the report of `out_dir` to `path` (default ``out_dir/report.html``) atomically
    and return that path. Raises UsageError as :func:`build_report`."""
    out_dir = Path(out_dir)
    path = Path(path) if path is not None else out_dir / "report.html"
    html = build_report(out_dir, group_by=group_by, report_dir=path.resolve().parent, study=study)
    atomic.write_text(path, html)
    log.info("wrote %s", path)
    return path
