"""Score maths: tumour bulk, compartment areas, stromal TILs, densities. Pure functions:
arrays in, dataclasses/dicts out; no I/O.

Definitions (constants in :class:`ScoreConfig`, sources in configs/score.yaml):

- Compartments: ``tumour`` (invasive tumour epithelium), ``stroma`` (all stroma),
  ``other`` (necrosis, fat, normal, ...); ``tissue`` = the three together.
- Tumour bulk (ITWG, Salgado 2015: stroma is assessed *within the borders of the
  invasive tumour*): tumour regions closed with a disc of ``bulk_closing_radius_um`` and
  hole-filled, on a coarse grid. ``stroma_in_bulk`` = stroma inside the bulk.
- ``stromal_til_percent``: 100 × area of bulk stroma covered by lymphocyte nuclei ÷ bulk
  stroma area; nuclear area = N_lymphocytes_in_bulk_stroma × π (d/2)², d =
  ``lymphocyte_nucleus_diameter_um`` (non-overlapping nuclei; the segmented-area variant is
  reported as ``stromal_til_percent_segmented``).
- ``til_score_tiger``: 100 × N_lymphocytes_in_bulk_stroma × ``tiger_cell_area_um2`` ÷
  bulk stroma area (TIGER baseline, A_cell = 64 µm²), capped at 100.
- Densities: count ÷ compartment area in mm²; intratumoral lymphocytes (inside tumour
  epithelium) are the ``tumour`` entry of the lymphocyte class. The density map
  (``maps.zarr``): count in each ``density_grid_um`` grid cell ÷ the tissue area of that
  cell (region-map pixels of any tissue class), NaN where the cell holds no tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from tilscore.errors import UsageError
from tilscore.prepare.tissue import COARSE_MPP

COMPARTMENT_OF_REGION = {1: "tumour", 2: "stroma", 3: "other"}  # 0 = background
REGION_CLASSES = ("background", *COMPARTMENT_OF_REGION.values())  # a region model's, in order
# QuPath's weak/moderate/strong DAB lower limits, 0.2/0.4/0.6 in its log10 optical
# density, in tilscore's natural-log OD (ln(I0 / I) = ln 10 x log10(I0 / I)).
QUPATH_DAB_BINS_LOG10_OD = (0.2, 0.4, 0.6)
DAB_BINS_OD = tuple(round(b * math.log(10), 3) for b in QUPATH_DAB_BINS_LOG10_OD)


# The accepted range (inclusive) of every score setting, checked when the configuration is
# read, before any slide runs: a value outside it is a typo, not a choice (a density grid
# of 1e-6 µm once passed and then asked for a 233 PiB array after every slide's model
# pass; ``.inf`` passed too). Wide enough for any real protocol: see configs/score.yaml.
SCORE_RANGES = {
    "bulk_closing_radius_um": (0.0, 2000.0, "µm"),
    "lymphocyte_nucleus_diameter_um": (1.0, 30.0, "µm"),
    "tiger_cell_area_um2": (1.0, 1000.0, "µm²"),
    "near_tumour_um": (0.0, 2000.0, "µm"),
    "density_grid_um": (10.0, 10000.0, "µm"),
    "coarse_mpp": (2.0, 64.0, "µm/px"),  # the region map is 2 µm/px
    "spatial_band_inner_um": (1.0, 5000.0, "µm"),  # tilscore.scoring.spatial stroma bands
    "spatial_band_outer_um": (2.0, 10000.0, "µm"),
    # natural-log OD: an 8-bit pixel reaches at most ln 255 = 5.5, so nothing above 6
    "foxp3_dab_threshold_od": (0.01, 6.0, "OD"),
    "cd20_dab_threshold_od": (0.01, 6.0, "OD"),
    "dab_bin_weak_od": (0.01, 6.0, "OD"),
    "dab_bin_moderate_od": (0.01, 6.0, "OD"),
    "dab_bin_strong_od": (0.01, 6.0, "OD"),
    # the IHC lymphocyte gate (configs/score.yaml)
    "lymphocyte_min_contrast_od": (0.0, 6.0, "OD"),
    "lymphocyte_min_diameter_um": (0.5, 30.0, "µm"),
    "lymphocyte_max_diameter_um": (1.0, 50.0, "µm"),
    "lymphocyte_min_axis_ratio": (0.0, 1.0, "(minor / major)"),
}
# Score-configuration keys of the lymphocyte gate -> tilscore.ihc_detect.NucleusParams
LYMPHOCYTE_GATE_KEYS = {"lymphocyte_min_contrast_od": "min_contrast_od",
                        "lymphocyte_min_diameter_um": "min_diameter_um",
                        "lymphocyte_max_diameter_um": "max_diameter_um",
                        "lymphocyte_min_axis_ratio": "min_axis_ratio"}
OPTIONAL_SETTINGS = ("foxp3_dab_threshold_od", "cd20_dab_threshold_od", "dab_bin_weak_od",
                     "dab_bin_moderate_od", "dab_bin_strong_od",
                     *LYMPHOCYTE_GATE_KEYS)  # None: the marker's (the gate's) default


def _in_range(value, low: float, high: float) -> bool:
    """A real, finite number (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return False
    return math.isfinite(value) and low <= value <= high


@dataclass(frozen=True)
class ScoreConfig:
    """Score constants (sources in configs/score.yaml). The IHC entries override the H-DAB
    detector's per-marker defaults (:func:`tilscore.ihc_detect.ihc_params`, docs/ihc.md);
    None keeps the default: ``<marker>_dab_threshold_od`` is the DAB excess (OD) a cell
    needs to be positive, ``dab_bin_*_od`` the lower limits of QuPath-style intensity
    bins; ``lymphocyte_*`` the lymphocyte gate's limits (the same for every marker)."""

    bulk_closing_radius_um: float = 250.0
    lymphocyte_nucleus_diameter_um: float = 7.0
    tiger_cell_area_um2: float = 64.0
    near_tumour_um: float = 50.0
    density_grid_um: float = 100.0
    coarse_mpp: float = COARSE_MPP
    spatial_band_inner_um: float = 100.0
    spatial_band_outer_um: float = 500.0
    foxp3_dab_threshold_od: float | None = None
    cd20_dab_threshold_od: float | None = None
    dab_bin_weak_od: float | None = None
    dab_bin_moderate_od: float | None = None
    dab_bin_strong_od: float | None = None
    lymphocyte_min_contrast_od: float | None = None
    lymphocyte_min_diameter_um: float | None = None
    lymphocyte_max_diameter_um: float | None = None
    lymphocyte_min_axis_ratio: float | None = None

    def __post_init__(self):
        for name, (low, high, unit) in SCORE_RANGES.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_SETTINGS:
                continue
            if not _in_range(value, low, high):
                raise UsageError(f"{name} must be a number from {low:g} to {high:g} {unit}, "
                                 f"got {value!r}")
        if not self.spatial_band_inner_um < self.spatial_band_outer_um:
            raise UsageError(f"spatial_band_inner_um ({self.spatial_band_inner_um}) must be "
                             f"below spatial_band_outer_um ({self.spatial_band_outer_um})")
        lo, hi = self.lymphocyte_min_diameter_um, self.lymphocyte_max_diameter_um
        if lo is not None and hi is not None and not lo < hi:
            raise UsageError(f"lymphocyte_min_diameter_um ({lo}) must be below "
                             f"lymphocyte_max_diameter_um ({hi})")
        self.dab_bins()  # bad bins are an error whatever the stain of the run

    def dab_bins(self, default_bins_od: tuple[float, float, float] = DAB_BINS_OD
                 ) -> tuple[float, float, float] | None:
        """The intensity bins with this configuration's overrides (None: none set);
        UsageError unless weak < moderate < strong."""
        given = (self.dab_bin_weak_od, self.dab_bin_moderate_od, self.dab_bin_strong_od)
        if all(b is None for b in given):
            return None
        bins = tuple(d if b is None else b for b, d in zip(given, default_bins_od, strict=True))
        if not bins[0] < bins[1] < bins[2]:
            raise UsageError(f"DAB intensity bins must increase (weak < moderate < strong), "
                             f"got {bins}")
        return bins

    def ihc_overrides(self, marker: str,
                      default_bins_od: tuple[float, float, float] = DAB_BINS_OD) -> dict:
        """Keyword overrides of :class:`~tilscore.ihc_detect.IhcParams` for `marker`
        ("foxp3" or "cd20"); `default_bins_od`: the bins for those not set."""
        out = {}
        threshold = getattr(self, f"{marker}_dab_threshold_od", None)
        if threshold is not None:
            out["dab_threshold_od"] = threshold
        bins = self.dab_bins(default_bins_od)
        if bins is not None:
            out["bins_od"] = bins
        for key, param in LYMPHOCYTE_GATE_KEYS.items():
            if getattr(self, key) is not None:
                out[param] = getattr(self, key)
        return out


def tumour_bulk(tumour_fraction: np.ndarray, *, coarse_mpp: float, radius_um: float) -> np.ndarray:
    """bool (H, W) tumour bulk on a coarse grid from the tumour fraction (float (H, W)) per
    coarse pixel: pixels ≥ 25 % tumour, closed with a disc of `radius_um`, holes filled."""
    tumour = tumour_fraction >= 0.25
    if not tumour.any():
        return tumour
    # Closing with a disc of radius r via Euclidean distance transforms: O(N) whatever
    # the radius (a 63 x 63 structuring element costs ~40 s on a 25 x 50 mm slide).
    r = max(1.0, radius_um / coarse_mpp)
    pad = int(np.ceil(r)) + 1  # so closing near the edge is not clipped by the border
    padded = np.pad(tumour, pad)
    dilated = ndi.distance_transform_edt(~padded) <= r
    closed = ndi.distance_transform_edt(dilated) > r
    return ndi.binary_fill_holes(closed[pad:-pad, pad:-pad])


@dataclass(frozen=True)
class RegionAreas:
    """Areas in mm²: ``tumour``, ``stroma``, ``other``, ``tissue``, ``stroma_in_bulk``,
    ``bulk``; ``nuclear_area_in_bulk_stroma_mm2``: segmented lymphocyte-nucleus area there."""

    tumour: float
    stroma: float
    other: float
    stroma_in_bulk: float
    bulk: float
    nuclear_area_in_bulk_stroma_mm2: float

    @property
    def tissue(self) -> float:
        return self.tumour + self.stroma + self.other

    def as_dict(self) -> dict:
        return {"tissue": self.tissue, "tumour": self.tumour, "stroma": self.stroma,
                "other": self.other, "stroma_in_tumour_bulk": self.stroma_in_bulk,
                "tumour_bulk": self.bulk}


def counts_by_compartment(cls_names: list[str], cell_cls: np.ndarray, *, compartment: np.ndarray,
                          in_bulk: np.ndarray | None = None) -> dict[str, dict[str, int]]:
    """{class: {tumour, stroma, other, tissue[, stroma_in_tumour_bulk]}} counts; `cell_cls`
    int indices into `cls_names`, `compartment` str array ("tumour"/"stroma"/"other"),
    `in_bulk` bool array (the cell lies in the tumour bulk)."""
    out = {}
    for k, name in enumerate(cls_names):
        mine = compartment[cell_cls == k]
        row = {c: int((mine == c).sum()) for c in ("tumour", "stroma", "other")}
        row["tissue"] = int(len(mine))
        if in_bulk is not None:
            row["stroma_in_tumour_bulk"] = int(((mine == "stroma") & in_bulk[cell_cls == k]).sum())
        out[name] = row
    return out


def densities(counts: dict[str, dict[str, int | None]], areas: RegionAreas) -> dict:
    """Counts ÷ area (per mm²) per compartment; None where the area is 0 or the count was
    not measured (None)."""
    area = {"tumour": areas.tumour, "stroma": areas.stroma, "other": areas.other,
            "tissue": areas.tissue, "stroma_in_tumour_bulk": areas.stroma_in_bulk}
    return {name: {c: (n / area[c] if n is not None and area[c] > 0 else None)
                   for c, n in row.items()}
            for name, row in counts.items()}


def stromal_tils(n_lymph_bulk_stroma: int, areas: RegionAreas, *, cfg: ScoreConfig,
                 nuclei_segmented: bool = True) -> dict:
    """sTIL % (disc and segmented nuclear area) and the TIGER score, with their parts.
    `nuclei_segmented` False (a cell model without a nucleus channel): the segmented
    sTIL % is None, not 0."""
    stroma_um2 = areas.stroma_in_bulk * 1e6
    disc_um2 = math.pi * (cfg.lymphocyte_nucleus_diameter_um / 2) ** 2
    if stroma_um2 <= 0:
        pct = seg = tiger = None
    else:
        pct = min(100.0, 100.0 * n_lymph_bulk_stroma * disc_um2 / stroma_um2)
        seg = (min(100.0, 100.0 * areas.nuclear_area_in_bulk_stroma_mm2 * 1e6 / stroma_um2)
               if nuclei_segmented else None)
        tiger = min(100.0, 100.0 * n_lymph_bulk_stroma * cfg.tiger_cell_area_um2 / stroma_um2)
    return {
        "stromal_til_percent": pct,
        "stromal_til_percent_segmented": seg,
        "til_score_tiger": tiger,
        "til_parts": {
            "lymphocytes_in_bulk_stroma": int(n_lymph_bulk_stroma),
            "bulk_stroma_area_mm2": areas.stroma_in_bulk,
            "nucleus_area_um2": disc_um2,
            "tiger_cell_area_um2": cfg.tiger_cell_area_um2,
        },
    }


def fraction_near(points_xy_um: np.ndarray, target_mask: np.ndarray, *, mask_mpp: float,
                  distance_um: float) -> float | None:
    """Fraction of points within `distance_um` of True pixels of `target_mask` (bool grid
    at `mask_mpp`, origin at 0 µm); None when there are no points."""
    if len(points_xy_um) == 0:
        return None
    if not target_mask.any():
        return 0.0
    dist_um = ndi.distance_transform_edt(~target_mask) * mask_mpp
    j = np.clip((points_xy_um[:, 0] / mask_mpp).astype(int), 0, target_mask.shape[1] - 1)
    i = np.clip((points_xy_um[:, 1] / mask_mpp).astype(int), 0, target_mask.shape[0] - 1)
    return float((dist_um[i, j] <= distance_um).mean())


def density_map(points_xy_um: np.ndarray, tissue_mm2: np.ndarray, *, grid_um: float
                ) -> np.ndarray:
    """float32 (rows, cols) points per mm² of tissue on a `grid_um` grid: the points in each
    grid cell ÷ that cell's tissue area, `tissue_mm2` (float (rows, cols) mm², e.g.
    :func:`tilscore.aggregate.tissue_area_grid`); NaN where the cell holds no tissue (not
    measured, not zero). Cell (i, j) covers [j·g, (j+1)·g) × [i·g, (i+1)·g) µm; points
    beyond the grid count in its edge cells. Dividing by tissue rather than by the grid
    cell's area makes a cell at the tissue's edge (or the slide's) as dense as the tissue
    it holds, and the map's tissue-weighted mean the summary's ``tissue`` density."""
    tissue = np.asarray(tissue_mm2, np.float64)
    rows, cols = tissue.shape
    hist = np.zeros((rows, cols), np.float64)
    if len(points_xy_um):
        j = np.clip((points_xy_um[:, 0] // grid_um).astype(int), 0, cols - 1)
        i = np.clip((points_xy_um[:, 1] // grid_um).astype(int), 0, rows - 1)
        np.add.at(hist, (i, j), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tissue > 0, hist / tissue, np.nan).astype(np.float32)
