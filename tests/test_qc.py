"""QC: the focus measure separates sharp from blurred tissue, flags fire on blurred and
pen-marked synthetic slides and stay quiet on clean ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tilscore.cli import main
from tilscore.scoring.qc import QcConfig, focus_measure, out_of_focus_fraction, qc_flags


def _tiles(blur_sigma_px: float, n: int = 4) -> torch.Tensor:
    from tilscore.synth.scene import SyntheticScene

    scene = SyntheticScene(4096, 4096, mpp=0.25, stain="he", seed=3,
                           blur_sigma_px=blur_sigma_px)
    tiles = [scene.render(600.0 + 700 * k, 1500.0, width=128, height=128,
                          downsample=2.0) for k in range(n)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def test_focus_measure_separates_sharp_from_defocused_tissue():
    threshold = QcConfig().focus_min_var_he
    sharp = focus_measure(_tiles(0.0))
    blurred = focus_measure(_tiles(2.0))
    assert (sharp > threshold).all() and (blurred < threshold).all()
    ink = _tiles(0.0)[:1].clone()
    ink[..., :, :80] = torch.tensor([30, 60, 150], dtype=torch.uint8).view(1, 3, 1, 1)
    assert focus_measure(ink) > threshold  # smooth pen ink beside sharp tissue
    glass = torch.full((1, 3, 64, 64), 240, dtype=torch.uint8)
    assert torch.isnan(focus_measure(glass)).all()
    both = torch.cat([sharp, blurred, focus_measure(glass)]).numpy()
    weights = np.array([1, 1, 1, 1, 1, 1, 1, 0.75, 1.0])
    assert out_of_focus_fraction(both, weights, threshold=threshold) == pytest.approx(3.75 / 7.75)
    little_tissue = np.full(9, 0.2)
    assert out_of_focus_fraction(both, little_tissue, threshold=threshold) is None


def test_flags_have_codes_and_plain_messages():
    qc = {"out_of_focus_fraction": 0.18, "pen_fraction": 0.03, "mpp_source": "override",
          "failed_tiles": 2, "tiles": 100, "tissue_mask_area_mm2": 0.1,
          "stain_vectors": {"source": "estimated",
                            "angle_deg": {"haematoxylin": 4.0, "dab": 22.0}}}
    flags = {f["code"]: f["message"] for f in qc_flags(qc, "he")}
    assert set(flags) == {"blur", "pen", "mpp", "failed_tiles", "little_tissue", "stain"}
    assert flags["blur"].startswith("18% of tissue out of focus") and "stromal TIL %" in \
        flags["blur"]
    assert "dab 22°" in flags["stain"]
    clean = {"out_of_focus_fraction": 0.02, "pen_fraction": 0.0, "mpp_source": "metadata",
             "failed_tiles": 0, "tiles": 10, "tissue_mask_area_mm2": 5.0}
    assert qc_flags(clean, "he") == []
    sparse = {"source": "default", "fallback": "little_dab",
              "reason": "too little DAB to estimate it (2% ...)", "angle_deg": {"dab": 21.0}}
    assert qc_flags({**clean, "stain_vectors": sparse}, "foxp3") == []
    faint = qc_flags({**clean, "od_percentiles": {"p05": 0.05, "p50": 0.23, "p95": 0.37}}, "he")
    assert [f["code"] for f in faint] == ["faint"] and "0.23" in faint[0]["message"]
    eosin = {"source": "default", "fallback": "eosin",
             "reason": "second stain looks like eosin, not DAB"}
    (flag,) = qc_flags({**clean, "stain_vectors": eosin}, "cd20")
    assert flag["code"] == "stain" and "eosin" in flag["message"]
    assert [f["code"] for f in qc_flags({**clean, "dab_positive_percent": 0.1}, "cd20")] == [
        "no_dab"]


@pytest.fixture(scope="module")
def qc_batch(tmp_path_factory):
    from tilscore.synth.writer import write_synthetic_slide

    root = tmp_path_factory.mktemp("qc")
    kinds = {"clean": {}, "blurred": {"blur_sigma_px": 3.0}, "pen": {"pen_marks": True}}
    paths = [str(write_synthetic_slide(root / f"{name}.tiff", stain="he", seed=7,
                                       size_px=(3072, 3072), mpp=0.25, **kw).slide_path)
             for name, kw in kinds.items()]
    assert main(["score", *paths, "--out", str(root / "out"), "--device", "cpu", "-q"]) == 0
    return {name: json.loads((root / "out" / name / "summary.json").read_text())
            for name in kinds}


def test_qc_flags_fire_on_blur_and_pen_and_stay_quiet_on_clean(qc_batch):
    codes = {name: [f["code"] for f in s["qc"]["flags"]] for name, s in qc_batch.items()}
    assert codes["clean"] == []
    assert codes["blurred"] == ["blur"]
    # the marks cover ~40% of this small slide, so little tissue is left (and says so)
    assert codes["pen"] == ["pen", "little_tissue"]
    assert qc_batch["pen"]["qc"]["tissue_mask_area_mm2"] < QcConfig().tissue_min_mm2
    assert qc_batch["clean"]["qc"]["out_of_focus_fraction"] == 0.0
    assert qc_batch["clean"]["qc"]["od_percentiles"]["p50"] > QcConfig().he_min_median_od
    assert qc_batch["blurred"]["qc"]["out_of_focus_fraction"] > 0.9
    assert qc_batch["pen"]["qc"]["pen_fraction"] > QcConfig().pen_max_fraction


def test_out_of_domain_flags_need_enough_evidence():
    cfg = QcConfig()
    codes = lambda qc: [f["code"] for f in qc_flags(qc, "he", cfg=cfg)]  # noqa: E731
    carcinoma = {"region_uncertain_fraction": 0.12, "tumour_cells": 300,
                 "tumour_cells_in_tumour_fraction": 0.9}
    assert codes(carcinoma) == []
    assert codes({**carcinoma, "region_uncertain_fraction": 0.45}) == ["out_of_domain"]
    assert codes({**carcinoma, "tumour_cells_in_tumour_fraction": 0.5}) == [
        "epithelium_outside_tumour"]
    # too few epithelial-looking nuclei to judge; and IHC slides are not judged at all
    assert codes({**carcinoma, "tumour_cells": 20,
                  "tumour_cells_in_tumour_fraction": 0.1}) == []
    assert [f["code"] for f in qc_flags({**carcinoma, "region_uncertain_fraction": 0.9},
                                        "cd20", cfg=cfg)] == []


@pytest.mark.real_data
def test_skin_scored_as_carcinoma_is_flagged(tmp_path):
    """CMU-1-Small-Region is skin (epidermis, a hair follicle, dermis): it must not pass
    silently as breast carcinoma."""
    from tests.conftest import shared_path

    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    assert main(["score", str(svs), "--out", str(tmp_path), "--device", "cpu", "--quiet",
                 "--no-report"]) == 0
    qc = json.loads((tmp_path / "CMU-1-Small-Region" / "summary.json").read_text())["qc"]
    assert "epithelium_outside_tumour" in [f["code"] for f in qc["flags"]], qc
