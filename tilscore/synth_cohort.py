"""A small synthetic study for ``tilscore demo --cohort``: patients with an H&E, a CD20 and
a FOXP3 slide of a primary tumour (some also a metastasis with H&E and CD20 only, so
samples.csv shows a missing stain and the report a paired comparison), and overall
survival simulated with a known effect of the CD20+ density.

Truth per patient: an immune level ``u ~ N(0, 0.5²)`` sets the stromal lymphocyte
density of all its slides (1500 × e^u per mm², tumour 300 × e^u); the CD20+ fraction of
lymphocytes is ``0.35 × e^v`` (``v ~ N(0, 0.3²)``, capped at 0.9), FOXP3+ 0.15.
Metastases have 0.6 × the primary's lymphocyte densities. Survival: exponential with
hazard ``λ0 × HR^z``, z the standardised log of the primary's true CD20+ stromal density
(``log(density + 1)``, the transformation the report's Cox model uses), HR = 0.5 per SD
by default (more CD20+ B-cells, longer survival); administrative censoring at 60 months.
The estimate in the report (Cox per SD of the *measured* log density) should come near
it, with a CI as wide as a dozen patients allow.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilscore.batch import score_inputs
from tilscore.report.cohort import write_report
from tilscore.report.survival import StudyOptions
from tilscore.synth.writer import write_synthetic_slide

log = logging.getLogger(__name__)

BASE_STROMA, BASE_TUMOUR = 1500.0, 300.0  # lymphocytes per mm² (SceneParams defaults)
CD20_FRACTION, FOXP3_FRACTION = 0.35, 0.15
METASTASIS_FACTOR = 0.6
FOLLOW_UP_MONTHS = 60.0
BASELINE_HAZARD = 1 / 30.0  # per month: median survival ~21 months at z = 0


@dataclass(frozen=True)
class DemoCohort:
    manifest: Path
    truth: Path
    hr_per_sd: float
    n_patients: int
    n_slides: int


def write_demo_cohort(folder: Path, *, n_patients: int = 10, n_metastases: int = 3,
                      size_px: int = 1024, mpp: float = 0.5, seed: int = 0,
                      hr_per_sd: float = 0.5) -> DemoCohort:
    """Write the slides (``folder/slides/*.tiff`` with their truth files), ``manifest.csv``
    (path, stain, patient_id, sample_id, sample_type, os_months, os_event) and
    ``cohort_truth.json`` into `folder`; slides already there are kept (same seed, same
    pixels)."""
    folder = Path(folder)
    slides = folder / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    u = rng.normal(0.0, 0.5, n_patients)
    v = rng.normal(0.0, 0.3, n_patients)
    cd20_frac = np.minimum(0.9, CD20_FRACTION * np.exp(v))
    cd20_stroma = BASE_STROMA * np.exp(u) * cd20_frac  # true CD20+ per mm² of stroma
    lx = np.log(cd20_stroma + 1.0)
    z = (lx - lx.mean()) / lx.std(ddof=1)
    t = rng.exponential(1.0 / (BASELINE_HAZARD * hr_per_sd ** z))
    event = (t < FOLLOW_UP_MONTHS).astype(int)
    t = np.minimum(t, FOLLOW_UP_MONTHS)
    rows, truth = [], []
    for i in range(n_patients):
        pid = f"P{i + 1:02d}"
        samples = [("primary", 1.0, ("he", "cd20", "foxp3"))]
        if i < n_metastases:
            samples.append(("metastasis", METASTASIS_FACTOR, ("he", "cd20")))
        for kind, factor, stains in samples:
            sid = f"{pid}-{kind[0].upper()}"
            for stain in stains:
                name = f"{sid}-{stain}"
                knobs = dict(lymphocyte_density_stroma_per_mm2=BASE_STROMA * math.exp(u[i])
                             * factor,
                             lymphocyte_density_tumour_per_mm2=BASE_TUMOUR * math.exp(u[i])
                             * factor)
                if stain == "cd20":
                    knobs["positive_fraction"] = float(cd20_frac[i])
                elif stain == "foxp3":
                    knobs["positive_fraction"] = FOXP3_FRACTION
                path = slides / f"{name}.tiff"
                if not path.exists():
                    write_synthetic_slide(path, stain=stain, seed=seed * 1000 + len(rows),
                                          size_px=(size_px, size_px), mpp=mpp, workers=2,
                                          **knobs)
                rows.append({"path": f"slides/{name}.tiff", "slide_id": name, "stain": stain,
                             "patient_id": pid, "sample_id": sid, "sample_type": kind,
                             "os_months": f"{t[i]:.2f}", "os_event": int(event[i])})
        truth.append({"patient_id": pid, "immune_level_u": float(u[i]),
                      "cd20_fraction": float(cd20_frac[i]),
                      "cd20_stroma_per_mm2": float(cd20_stroma[i]), "z": float(z[i]),
                      "os_months": float(t[i]), "os_event": int(event[i])})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    truth_path = folder / "cohort_truth.json"
    truth_path.write_text(json.dumps({
        "hr_per_sd_of_log_cd20_stroma_density": hr_per_sd,
        "baseline_hazard_per_month": BASELINE_HAZARD, "follow_up_months": FOLLOW_UP_MONTHS,
        "seed": seed, "patients": truth}, indent=2) + "\n")
    return DemoCohort(manifest, truth_path, hr_per_sd, n_patients, len(rows))


def run_demo_cohort(out: Path, *, n_patients: int = 10, size_px: int = 1024,
                    device: str = "auto", seed: int = 0) -> tuple[Path, DemoCohort, object]:
    """Write the cohort under ``out/cohort``, score it into ``out`` and write the report
    with the survival section; returns (report path, the cohort, the batch result)."""
    out = Path(out)
    cohort = write_demo_cohort(out / "cohort", n_patients=n_patients,
                               n_metastases=min(3, n_patients), size_px=size_px, seed=seed)
    result = score_inputs([str(cohort.manifest)], out, device=device, quiet=True,
                          report=False)
    study = StudyOptions("os_months", "os_event", level="patient")
    path = write_report(out, group_by="sample_type", study=study)
    return path, cohort, result
