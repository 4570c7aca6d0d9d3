"""The score of one slide: :class:`SlideScore`, frozen and typed, computed by pure
functions from the stitched cells and the aggregated region map (arrays in, dataclasses
out; no I/O). The writers and ``summary.json`` read it (:meth:`SlideScore.as_dict`).

Parts: the areas (mm²), counts and densities per cell class and compartment, the H&E
scores (:class:`HeScore`: stromal TIL %, TIGER score, their parts) or the IHC scores
(:class:`IhcScore`: percent positive, DAB intensity bins, H-score, the rule), the QC
numbers and flags (:class:`QcReport`) and the plain-language warnings. The maths of each
number is in :mod:`tilscore.score` (definitions and sources there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from tilscore.scoring.ihc_cells import INTENSITY_BINS
from tilscore.scoring.ihc_detect import GATES, IhcParams, ihc_params
from tilscore.scoring.qc import (
    focus_threshold,
    out_of_focus_fraction,
    qc_flags,
    tissue_od_percentiles,
)
from tilscore.scoring.score import (
    COMPARTMENT_OF_REGION,
    LYMPHOCYTE_GATE_KEYS,
    OPTIONAL_SETTINGS,
    RegionAreas,
    ScoreConfig,
    counts_by_compartment,
    densities,
    fraction_near,
    stromal_tils,
)

if TYPE_CHECKING:
    from tilscore.prepare.tissue import TissueMask
    from tilscore.scoring.aggregate import RegionSummary
    from tilscore.scoring.ihc import StainVectors

# A slide's cells: columns of equal length N. ``x_px``, ``y_px`` (float64, level-0 px),
# ``x_um``, ``y_um``, ``cls`` (int index into the class names), ``class`` (str),
# ``score``, ``region`` (uint8 region code), ``compartment`` (str), ``in_bulk`` (bool),
# and on IHC the cell rule's measurements and ``gate`` (str).
CellTable = dict[str, np.ndarray]
Counts = Mapping[str, Mapping[str, "int | None"]]  # {class: {compartment: n}}, None: not measured

DAB_BIN_SETTINGS = ("dab_bin_weak_od", "dab_bin_moderate_od", "dab_bin_strong_od")


def counted_class(stain: str) -> str:
    """The cell class a stain's score counts (drawn on the overlay, mapped as density)."""
    return "lymphocyte" if stain == "he" else f"{stain}_positive"


def ihc_rule_params(stain: str, cfg: ScoreConfig) -> IhcParams:
    """The :class:`~tilscore.ihc_detect.IhcParams` an IHC stain is scored with: the
    marker's defaults with the score configuration's overrides."""
    return ihc_params(stain, **cfg.ihc_overrides(stain))


def score_settings_used(stain: str, cfg: ScoreConfig) -> dict:
    """The score settings a slide of `stain` is scored with, every value resolved: the
    summary's ``score_config`` (the one record of them). On IHC the marker's positive
    threshold and the intensity bins are the values the cell rule used (the marker's
    defaults where the configuration leaves them null), and so are the lymphocyte gate's
    limits; settings of other stains are left out (H&E has no DAB settings or gate, a
    FOXP3 slide no CD20 threshold)."""
    used = {k: v for k, v in cfg.__dict__.items() if k not in OPTIONAL_SETTINGS}
    if stain != "he":
        params = ihc_rule_params(stain, cfg)
        used[f"{stain}_dab_threshold_od"] = params.dab_threshold_od
        used.update(zip(DAB_BIN_SETTINGS, params.bins_od, strict=True))
        used.update({key: getattr(params.nuclei, name)
                     for key, name in LYMPHOCYTE_GATE_KEYS.items()})
    return used


def cell_table(raw: Mapping[str, np.ndarray], class_names: Sequence[str], *, slide_mpp: float,
               regions: RegionSummary, with_compartments: bool = True) -> CellTable:
    """Cells on tissue with class names, µm coordinates, compartment, tumour-bulk flag
    (and any extra columns of `raw`, e.g. DAB optical density on IHC; the IHC gate code
    becomes its name). `raw`: the stitched cells (``x_px``, ``y_px`` level-0 px, ``cls``,
    ``score``, ...). Without compartments (no compartment model) the compartment is ""
    (unknown, as the summary's nulls say), not "other"."""
    region = regions.compartment_at(raw["x_px"] * slide_mpp, raw["y_px"] * slide_mpp)
    on_tissue = region > 0
    t = {k: v[on_tissue] for k, v in raw.items()}
    t["region"] = region[on_tissue]
    names = np.array(class_names)
    comp_names = np.array(["other", *[COMPARTMENT_OF_REGION[k] for k in (1, 2, 3)]])
    x_um, y_um = t["x_px"] * slide_mpp, t["y_px"] * slide_mpp
    bi = np.clip((y_um / regions.coarse_mpp).astype(int), 0, regions.bulk.shape[0] - 1)
    bj = np.clip((x_um / regions.coarse_mpp).astype(int), 0, regions.bulk.shape[1] - 1)
    if "gate" in t:
        t["gate"] = np.array(GATES)[t["gate"].astype(np.int64)]
    compartment = comp_names[t["region"]] if with_compartments else np.full(len(x_um), "")
    return {
        **t, "x_um": x_um, "y_um": y_um, "class": names[t["cls"]],
        "compartment": compartment, "in_bulk": regions.bulk[bi, bj]
        if regions.bulk.size else np.zeros(len(x_um), bool),
    }


@dataclass(frozen=True)
class Areas:
    """Reported areas in mm² (None: not known, e.g. every compartment but ``tissue``
    without a compartment model)."""

    tissue: float | None
    tumour: float | None
    stroma: float | None
    other: float | None
    stroma_in_tumour_bulk: float | None
    tumour_bulk: float | None

    @classmethod
    def of(cls, areas: RegionAreas, *, tissue_only: bool = False) -> Areas:
        values = areas.as_dict()
        if tissue_only:
            values = {c: (a if c == "tissue" else None) for c, a in values.items()}
        return cls(**values)


@dataclass(frozen=True)
class TilParts:
    """What the stromal TIL scores are made of."""

    lymphocytes_in_bulk_stroma: int
    bulk_stroma_area_mm2: float
    nucleus_area_um2: float  # one lymphocyte nucleus (disc of the configured diameter)
    tiger_cell_area_um2: float


@dataclass(frozen=True)
class HeScore:
    """H&E: stromal TIL % (ITWG: disc and segmented nuclear area; None where there is no
    bulk stroma or no nucleus channel), the TIGER score, their parts, and the fraction of
    stromal lymphocytes within `near_tumour_um` of tumour (None in the fast mode)."""

    stromal_til_percent: float | None
    stromal_til_percent_segmented: float | None
    til_score_tiger: float | None
    til_parts: TilParts
    stromal_lymphocytes_near_tumour_fraction: float | None
    near_tumour_um: float


@dataclass(frozen=True)
class IhcScore:
    """IHC: percent positive of detected cells (over tissue and per compartment), QuPath
    style DAB intensity bins and H-score (0–300), where the marker's DAB must lie
    (``positive_rule``), and why cells are negative besides their DAB (``gate_counts``,
    None without gate codes)."""

    percent_positive: float | None
    percent_positive_by_compartment: Mapping[str, float | None]
    intensity_bins: Mapping[str, int]
    h_score: float | None
    positive_rule: Mapping[str, object]
    gate_counts: Mapping[str, int] | None


@dataclass(frozen=True)
class HeQc:
    """H&E: do tumour-class cells sit in tumour?"""

    tumour_cells: int
    tumour_cells_in_tumour_fraction: float | None


@dataclass(frozen=True)
class IhcQc:
    """IHC: the stain vectors the cell rule used and the percent DAB-positive."""

    stain_vectors: Mapping[str, object]
    dab_positive_percent: float | None


@dataclass(frozen=True)
class QcReport:
    """QC numbers measured while scoring and the flags they raise (:mod:`tilscore.qc`,
    docs/qc.md)."""

    tissue_mask_area_mm2: float
    pen_fraction: float
    mpp_source: str
    tiles: int
    failed_tiles: int
    out_of_focus_fraction: float | None
    focus_threshold: float
    focus_median: float | None
    od_percentiles: Mapping[str, float] | None
    region_uncertain_fraction: float | None
    he: HeQc | None
    ihc: IhcQc | None
    flags: tuple[Mapping[str, str], ...]  # {"code", "message"}

    def as_dict(self) -> dict:
        """The summary's ``qc`` section (the stain's part flat, the flags last)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("he", "ihc", "flags")}
        for part in (self.he, self.ihc):
            if part is not None:
                out.update(asdict(part))
        out["flags"] = [dict(f) for f in self.flags]
        return out


@dataclass(frozen=True)
class SlideScore:
    """Everything scored on one slide; exactly one of `he` and `ihc` is set."""

    stain: str
    areas: Areas
    counts: Counts
    densities_per_mm2: Mapping[str, Mapping[str, float | None]]
    he: HeScore | None
    ihc: IhcScore | None
    qc: QcReport
    warnings: tuple[str, ...]

    def as_dict(self) -> dict:
        """The score part of ``summary.json``, in its order: ``areas_mm2``, ``counts``,
        ``densities_per_mm2``, the stain's scores, ``qc``, ``warnings``."""
        scores = asdict(self.he if self.he is not None else self.ihc)
        return {"areas_mm2": asdict(self.areas),
                "counts": {k: dict(v) for k, v in self.counts.items()},
                "densities_per_mm2": {k: dict(v) for k, v in self.densities_per_mm2.items()},
                **scores, "qc": self.qc.as_dict(), "warnings": list(self.warnings)}


def he_score(cells: CellTable, regions: RegionSummary, *, cfg: ScoreConfig,
             all_stroma: bool = True, nuclei_segmented: bool = True) -> HeScore:
    """Stromal TIL % (ITWG and TIGER) with their parts, and lymphocytes near tumour
    (None unless `all_stroma`: the fast mode looks only in the bulk's stroma).
    `nuclei_segmented`: the cell model has a nucleus channel (else no segmented sTIL)."""
    stromal = (cells["class"] == "lymphocyte") & (cells["compartment"] == "stroma")
    n_bulk_stroma = int((stromal & cells["in_bulk"]).sum())
    pts = np.stack([cells["x_um"], cells["y_um"]], axis=1)
    near = (fraction_near(pts[stromal], regions.tumour, mask_mpp=regions.coarse_mpp,
                          distance_um=cfg.near_tumour_um) if all_stroma else None)
    tils = stromal_tils(n_bulk_stroma, regions.areas, cfg=cfg, nuclei_segmented=nuclei_segmented)
    return HeScore(stromal_til_percent=tils["stromal_til_percent"],
                   stromal_til_percent_segmented=tils["stromal_til_percent_segmented"],
                   til_score_tiger=tils["til_score_tiger"],
                   til_parts=TilParts(**tils["til_parts"]),
                   stromal_lymphocytes_near_tumour_fraction=near,
                   near_tumour_um=cfg.near_tumour_um)


def ihc_score(cells: CellTable, counts: Counts, *, stain: str, params: IhcParams) -> IhcScore:
    """Percent positive (of detected cells, per compartment), DAB intensity bins and the
    rule that called a cell positive (`params`: the cell rule's)."""
    pos, neg = counts[f"{stain}_positive"], counts["negative"]
    percent = {k: (100.0 * pos[k] / (pos[k] + neg[k])
                   if pos[k] is not None and pos[k] + neg[k] else None) for k in pos}
    bins = np.bincount(cells["intensity_bin"].astype(np.int64), minlength=4)[:4] \
        if len(cells["cls"]) else np.zeros(4, np.int64)
    n = int(bins.sum())
    return IhcScore(
        percent_positive=percent["tissue"],
        percent_positive_by_compartment=percent,
        intensity_bins=dict(zip(INTENSITY_BINS, map(int, bins), strict=True)),
        # QuPath-style H-score (0–300) over every detected cell, from the DAB bins
        h_score=float((bins * np.arange(4)).sum() * 100 / n) if n else None,
        # the threshold, bins and gate limits it used are in score_config
        # (score_settings_used); where the marker's DAB must lie:
        positive_rule={"compartment": params.compartment,
                       "marker_location": _marker_location(params)},
        # why cells are negative besides their DAB (cells.csv `gate`), over all tissue
        gate_counts={name: int((cells["gate"] == name).sum()) for name in GATES}
        if "gate" in cells else None,
    )


def _marker_location(params: IhcParams) -> dict:
    """The marker-location rule of IHC `params` (docs/ihc.md)."""
    if params.compartment == "nucleus":
        return {"dab_blob_closed_within_um": params.blob_window_um}
    return {"min_haematoxylin_fraction": params.min_haematoxylin_fraction,
            "max_diameter_um": params.nuclei.max_diameter_um + 2 * params.stained_rim_um}


@dataclass(frozen=True)
class QcInputs:
    """What the tissue detection and the device pass measured for QC: the tissue `mask`
    and its `thumbnail` (uint8 RGB at the mask's mpp), the slide's `mpp_source`, tiles run
    and failed, `focus` (float32 per tile, grid order) with the tiles' tissue fractions,
    and the share of tissue whose region class is uncertain."""

    mask: TissueMask
    thumbnail: np.ndarray
    mpp_source: str
    tiles: int
    failed_tiles: int
    focus: np.ndarray
    tile_tissue_fraction: np.ndarray
    region_uncertain_fraction: float | None


def qc_report(cells: CellTable, measured: QcInputs, *, stain: str,
              stain_vectors: StainVectors | None = None,
              percent_positive: float | None = None) -> QcReport:
    """QC numbers measured while scoring and the flags they raise (tilscore.qc);
    `stain_vectors` and `percent_positive`: IHC's (None on H&E)."""
    threshold = focus_threshold(stain)
    m = measured
    qc = {
        "tissue_mask_area_mm2": m.mask.area_mm2,
        "pen_fraction": m.mask.pen_fraction,
        "mpp_source": m.mpp_source,
        "tiles": m.tiles,
        "failed_tiles": m.failed_tiles,
        "out_of_focus_fraction": out_of_focus_fraction(m.focus, m.tile_tissue_fraction,
                                                       threshold=threshold),
        "focus_threshold": threshold,
        "focus_median": float(np.nanmedian(m.focus)) if np.isfinite(m.focus).any() else None,
        "od_percentiles": tissue_od_percentiles(m.thumbnail, m.mask.mask),
        "region_uncertain_fraction": m.region_uncertain_fraction,
    }
    base = dict(qc)
    he = ihc = None
    if stain_vectors is None:  # H&E: do tumour-class cells sit in tumour?
        tumour_cells = cells["class"] == "tumour"
        he = HeQc(tumour_cells=int(tumour_cells.sum()),
                  tumour_cells_in_tumour_fraction=(
                      float((cells["compartment"][tumour_cells] == "tumour").mean())
                      if tumour_cells.any() else None))
        qc.update(asdict(he))
    else:
        sv = stain_vectors
        ihc = IhcQc(stain_vectors={"source": sv.source, "fallback": sv.fallback,
                                   "reason": sv.reason,
                                   "angle_deg": sv.angle_deg,
                                   "haematoxylin": sv.matrix[0].tolist(),
                                   "dab": sv.matrix[1].tolist(),
                                   "background_rgb": list(sv.background_rgb)},
                    dab_positive_percent=percent_positive)
        qc.update(asdict(ihc))
    return QcReport(**base, he=he, ihc=ihc, flags=tuple(qc_flags(qc, stain)))


def slide_warnings(areas: RegionAreas, *, stain: str, nothing_run: bool,
                   failed_tiles: int, no_compartments: bool = False) -> list[str]:
    """Plain-language problems a reader of the numbers must know about; `nothing_run`:
    no tile went through the model (so there are no cells either)."""
    out = []
    if nothing_run:
        out.append("no tissue detected: all areas and counts are zero")
    elif no_compartments:
        out.append("no compartment model (--model none): densities over all tissue only; "
                   "tumour and stroma are not separated")
    elif areas.tumour == 0:
        out.append("no invasive tumour found: " + ("stromal TIL % is undefined" if stain == "he"
                                                   else "tumour densities are undefined"))
    elif areas.stroma_in_bulk == 0 and stain == "he":
        out.append("no stroma inside the tumour bulk: stromal TIL % is undefined")
    if failed_tiles:
        out.append(f"{failed_tiles} tiles failed to decode and were skipped")
    return out


def slide_score(cells: CellTable, regions: RegionSummary, *, measured: QcInputs, stain: str,
                class_names: Sequence[str], cfg: ScoreConfig,
                ihc_params: IhcParams | None = None, stain_vectors: StainVectors | None = None,
                counted_compartment: str | None = None, all_stroma: bool = True,
                no_compartments: bool = False, nuclei_segmented: bool = True,
                extra_warnings: Sequence[str] = ()) -> SlideScore:
    """The :class:`SlideScore` of a slide from its cell table (:func:`cell_table`), region
    summary and QC measures.

    `class_names`: the cell classes in ``cls`` order; `ihc_params` and `stain_vectors`:
    the IHC cell rule's (None on H&E); `counted_compartment`: the only compartment whose
    counts were measured (``tissue`` without a compartment model; the fast mode's bulk
    stroma; None: all), the others are null, not zero; `all_stroma`: cells were searched
    in all stroma (False in the fast mode: no near-tumour fraction); `no_compartments`:
    no compartment model (``--model none``): only the ``tissue`` area is known;
    `nuclei_segmented`: the cell model has a nucleus channel; `extra_warnings`: appended
    (e.g. an --mpp override that disagrees with the file)."""
    areas = regions.areas
    counts = counts_by_compartment(list(class_names), cells["cls"],
                                   compartment=cells["compartment"],
                                   in_bulk=cells["in_bulk"])
    if counted_compartment is not None:
        counts = {k: {c: (n if c == counted_compartment else None) for c, n in row.items()}
                  for k, row in counts.items()}
    he = ihc = None
    if ihc_params is None:
        he = he_score(cells, regions, cfg=cfg, all_stroma=all_stroma,
                      nuclei_segmented=nuclei_segmented)
    else:
        ihc = ihc_score(cells, counts, stain=stain, params=ihc_params)
    qc = qc_report(cells, measured, stain=stain, stain_vectors=stain_vectors,
                   percent_positive=None if ihc is None else ihc.percent_positive)
    warnings = (slide_warnings(areas, stain=stain, nothing_run=measured.tiles == 0,
                               failed_tiles=measured.failed_tiles,
                               no_compartments=no_compartments)
                + [f["message"] for f in qc.flags if f["code"] == "no_dab"]
                + list(extra_warnings))
    return SlideScore(stain=stain, areas=Areas.of(areas, tissue_only=no_compartments),
                      counts=counts, densities_per_mm2=densities(counts, areas), he=he,
                      ihc=ihc, qc=qc, warnings=tuple(warnings))
