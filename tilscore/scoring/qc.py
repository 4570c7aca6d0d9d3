"""Slide quality control measured while scoring: focus per tile, and plain-language flags.

The focus measure runs on the device on the model's input tiles (no second pass over the
pixels); the flags turn `summary["qc"]` numbers into messages a pathologist can act on.
Thresholds are in :class:`QcConfig`, with where each value comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tilscore.prepare.tissue import optical_density
from tilscore.scoring.ihc import BENIGN_FALLBACKS

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
GLASS_GREY = 0.93  # grey level (0-1) above which a pixel is glass (pale IHC stroma is ~0.92)
MIN_TISSUE_FRACTION = 0.5  # tiles the mask calls less tissue are not judged for focus
BLOCK_PX = 32  # 16 µm at the model's 0.5 µm/px: a few nuclei
FOCUS_QUANTILE = 0.9  # a tile is as sharp as its sharpest tenth of tissue blocks
# A region pixel is "uncertain" when no class reaches this probability (2 µm pixels, the
# class probabilities averaged over them): tissue unlike what the model was trained on.
REGION_CONFIDENT_P = 0.6


@dataclass(frozen=True)
class QcConfig:
    """QC thresholds (documented in docs/qc.md with their calibration).

    `focus_min_var_he` / `focus_min_var_ihc`: a tile is out of focus when its focus
    measure (focus_measure, at the model's 0.5 µm/px) is below this (IHC has less
    contrast). Calibrated with scripts/calibrate_qc.py: sharp real H&E tiles ≥ 0.0071
    (CRCHP, CMU), sharp real IHC ≥ 0.0032 (DeepLIIF), sharp synthetic ≥ 0.0072; defocused
    synthetic tiles (σ 2 px at 0.25 µm/px) ≤ 0.0016; real tiles blurred with σ 0.5 µm
    have medians 0.0030–0.0040 (H&E) and 0.0014 (IHC).
    """

    focus_min_var_he: float = 0.0050
    focus_min_var_ihc: float = 0.0025
    out_of_focus_max_fraction: float = 0.10
    pen_max_fraction: float = 0.01
    stain_max_angle_deg: float = 15.0
    tissue_min_mm2: float = 0.2
    he_min_median_od: float = 0.30  # faint H&E (docs/qc.md: typical 0.58–0.98)
    dab_min_positive_percent: float = 0.5  # IHC: below this, no DAB signal to speak of
    # H&E out of domain (docs/qc.md: measured on the two training labs' held-out images,
    # a synthetic slide and CMU-1 skin with scripts/calibrate_ood.py). In-domain images
    # reach 0.24 uncertain tissue; with >= 50 tumour-class nuclei, >= 0.86 of them lie
    # in tumour (CMU-1 skin: 0.55).
    region_uncertain_max_fraction: float = 0.30
    tumour_cells_min: int = 50  # judge the tumour-cell agreement only with this many
    tumour_cells_in_tumour_min_fraction: float = 0.70


@torch.no_grad()  # (not inference_mode: it may run inside torch.compile)
def focus_measure(x: torch.Tensor, core: tuple[int, int] | None = None) -> torch.Tensor:
    """Focus of each tile: the sharpest tissue in it, as the FOCUS_QUANTILE of the
    variance of the Laplacian of grey (0–1) over BLOCK_PX blocks that are mostly tissue.

    Blocks, not the whole tile, so that smooth things sharing a tile with tissue (pen
    ink, glass, fat) do not make a sharp tile look blurred. `x`: uint8 (B, 3, H, W) on
    any device (channels_last is fine); `core` = (start, stop) restricts the measure to
    the tile core. Returns float32 (B,), NaN where no block is mostly tissue.
    """
    if core is not None:
        x = x[..., core[0] : core[1], core[0] : core[1]]
    grey = x.float().mean(dim=1, keepdim=True) / 255.0
    lap = F.conv2d(grey, _LAPLACIAN.to(grey.device).view(1, 1, 3, 3))
    tissue = (F.max_pool2d(grey, 3, stride=1) < GLASS_GREY).float()  # tissue, 1 px eroded
    n = F.avg_pool2d(tissue, BLOCK_PX)  # tissue fraction per block
    mean = F.avg_pool2d(lap * tissue, BLOCK_PX) / n.clamp(min=1e-6)
    var = F.avg_pool2d(lap.square() * tissue, BLOCK_PX) / n.clamp(min=1e-6) - mean.square()
    var = torch.where(n >= 0.5, var, torch.full_like(var, float("nan"))).flatten(1)
    return torch.nanquantile(var, FOCUS_QUANTILE, dim=1)  # NaN when every block is


@torch.no_grad()
def region_uncertainty(probs: torch.Tensor, background: int | None) -> torch.Tensor:
    """Share of each tile's tissue pixels whose most likely region class has a probability
    below REGION_CONFIDENT_P. `probs`: float (B, C, H, W) class probabilities (the
    region map's pixels); tissue = pixels whose most likely class is not `background`
    (None: every pixel). Returns float32 (B,), NaN for a tile without tissue."""
    conf, label = probs.max(dim=1)
    tissue = (label != background) if background is not None else torch.ones_like(conf).bool()
    n = tissue.float().sum(dim=(1, 2))
    unsure = ((conf < REGION_CONFIDENT_P) & tissue).float().sum(dim=(1, 2))
    return torch.where(n > 0, unsure / n.clamp(min=1), torch.full_like(n, float("nan")))


def tissue_weighted_mean(values, tissue_fraction) -> float | None:
    """Mean of per-tile `values` weighted by each tile's tissue share (NaN values and
    tiles without tissue left out); None when nothing is left."""
    v = np.asarray(values, float)
    w = np.ones_like(v) if tissue_fraction is None else np.asarray(tissue_fraction, float)
    ok = ~np.isnan(v) & (w > 0)
    return float((v[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else None


def out_of_focus_fraction(focus, tissue_fraction, *, threshold: float) -> float | None:
    """Tissue-weighted fraction of judged tiles whose `focus` is below `threshold`.

    `focus`: (N,) per tile (NaN: not measured); `tissue_fraction`: (N,) share of each
    tile the tissue mask calls tissue (pen ink excluded); tiles under
    MIN_TISSUE_FRACTION are not judged. None when no tile could be judged."""
    var, w = np.asarray(focus, float), np.asarray(tissue_fraction, float)
    judged = ~np.isnan(var) & (w >= MIN_TISSUE_FRACTION)
    if not judged.any():
        return None
    return float((w[judged] * (var[judged] < threshold)).sum() / w[judged].sum())


def tissue_od_percentiles(thumbnail_rgb, tissue) -> dict | None:
    """Stain intensity of the tissue: 5th/50th/95th percentiles of the optical-density
    norm (-ln((I + 1) / 256) per channel) of the tissue pixels of the ~8 µm/px thumbnail
    (uint8 (H, W, 3); `tissue` bool (H, W)). None without tissue."""
    if not tissue.any():
        return None
    od = np.linalg.norm(optical_density(thumbnail_rgb[tissue]), axis=-1)
    p05, p50, p95 = np.percentile(od, [5, 50, 95])
    return {"p05": float(p05), "p50": float(p50), "p95": float(p95)}


def focus_threshold(stain: str, cfg: QcConfig = QcConfig()) -> float:
    return cfg.focus_min_var_he if stain == "he" else cfg.focus_min_var_ihc


def qc_flags(qc: dict, stain: str, *, cfg: QcConfig = QcConfig()) -> list[dict]:
    """`{"code", "message"}` for every QC problem in `qc` (a summary's ``qc`` section)."""
    flags = []

    def flag(code: str, message: str) -> None:
        flags.append({"code": code, "message": message})

    score = "stromal TIL %" if stain == "he" else f"{stain.upper()}+ densities"
    blurred = qc.get("out_of_focus_fraction")
    if blurred is not None and blurred > cfg.out_of_focus_max_fraction:
        flag("blur", f"{100 * blurred:.0f}% of tissue out of focus: lymphocytes are missed "
                     f"there, so {score} may be underestimated")
    pen = qc.get("pen_fraction") or 0.0
    if pen > cfg.pen_max_fraction:
        flag("pen", f"pen marks on {100 * pen:.1f}% of the slide were excluded from tissue: "
                    "check that no tumour lies under them")
    stain_flag = _stain_message(qc.get("stain_vectors") or {}, cfg)
    if stain_flag:
        flag("stain", stain_flag)
    od = qc.get("od_percentiles") or {}
    if stain == "he" and od.get("p50") is not None and od["p50"] < cfg.he_min_median_od:
        flag("faint", f"faint staining (median tissue optical density {od['p50']:.2f} < "
                      f"{cfg.he_min_median_od:.2f}): faded or under-stained H&E; nuclei and "
                      "compartments may be missed")
    if qc.get("mpp_source") == "override":
        flag("mpp", "pixel size from --mpp, not from the file: areas and densities depend "
                    "on it being right")
    failed = qc.get("failed_tiles") or 0
    if failed:
        flag("failed_tiles", f"{failed} of {qc.get('tiles', 0)} tiles could not be decoded "
                             "and were skipped: their cells and areas are missing")
    area = qc.get("tissue_mask_area_mm2")
    if area is not None and 0 < area < cfg.tissue_min_mm2:
        flag("little_tissue", f"only {area:.2f} mm² of tissue: scores are based on few "
                              "cells and are uncertain")
    if area == 0:
        flag("no_tissue", "no tissue detected: nothing was scored")
    if stain == "he":
        _out_of_domain_flags(qc, cfg, flag)
    positive = qc.get("dab_positive_percent")
    if stain != "he" and positive is not None and positive < cfg.dab_min_positive_percent:
        flag("no_dab", f"almost no DAB signal ({positive:.2f}% of cells positive): is this "
                       f"really a {stain.upper()} IHC slide?")
    return flags


def _out_of_domain_flags(qc: dict, cfg: QcConfig, flag) -> None:
    """H&E tissue unlike the carcinoma the model learned: uncertain regions, or
    epithelial (tumour-class) nuclei that the region map puts outside tumour."""
    unsure = qc.get("region_uncertain_fraction")
    if unsure is not None and unsure > cfg.region_uncertain_max_fraction:
        flag("out_of_domain", f"the model is unsure of tumour vs stroma on {100 * unsure:.0f}% "
                              "of the tissue: it may not be the carcinoma H&E it was trained "
                              "on; check the overlay before trusting stromal TIL %")
    n = qc.get("tumour_cells") or 0
    inside = qc.get("tumour_cells_in_tumour_fraction")
    if n >= cfg.tumour_cells_min and inside is not None \
            and inside < cfg.tumour_cells_in_tumour_min_fraction:
        flag("epithelium_outside_tumour",
             f"{100 * (1 - inside):.0f}% of {n} epithelial-looking nuclei lie outside the "
             "tumour regions: tumour may be missed, or this is not invasive carcinoma (e.g. "
             "squamous or normal epithelium); stromal TIL % is unreliable")


def _stain_message(vectors: dict, cfg: QcConfig) -> str | None:
    """Unusual stain vectors: accepted estimates far from the reference, or estimates
    rejected as implausible (a sparse marker's too-little-DAB fallback is normal)."""
    if vectors.get("source") == "estimated":
        angles = vectors.get("angle_deg") or {}
        off = {k: v for k, v in angles.items() if v is not None
               and v > cfg.stain_max_angle_deg}
        if off:
            what = ", ".join(f"{k} {v:.0f}°" for k, v in off.items())
            return (f"unusual staining ({what} from the reference stain vectors): check "
                    "the stain and scanner")
        return None

    if vectors.get("fallback") and vectors["fallback"] not in BENIGN_FALLBACKS:
        return f"stain vectors not estimated ({vectors.get('reason')}); reference vectors used"
    return None
