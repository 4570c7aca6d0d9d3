"""Calibrate the focus QC threshold: variance of the Laplacian on sharp vs blurred tiles.

Usage: python scripts/calibrate_qc.py [--shared ../shared/data]

Prints percentiles of tilscore.scoring.qc.focus_measure (at 0.5 µm/px, the model's input) for
synthetic H&E/IHC tiles rendered sharp and with defocus blur, and for real tiles (CRCHP
H&E, the CMU Aperio slide, DeepLIIF IHC) sharp and Gaussian-blurred in software.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from tilscore.scoring.qc import focus_measure

TILE = 256


def measure(tiles: list[np.ndarray]) -> np.ndarray:
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    var, _ = focus_measure(x)
    return var.numpy()


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([gaussian_filter(img[..., c].astype(float), sigma) for c in range(3)],
                    -1).clip(0, 255).astype(np.uint8)


def synthetic(stain: str, blur_sigma_l0: float, n: int = 12) -> list[np.ndarray]:
    from tilscore.synth.scene import SyntheticScene

    scene = SyntheticScene(8192, 8192, mpp=0.25, stain=stain, seed=5,
                           blur_sigma_px=blur_sigma_l0)
    rng = np.random.default_rng(0)
    return [scene.render(float(rng.uniform(0, 8192 - 2 * TILE)),
                         float(rng.uniform(0, 8192 - 2 * TILE)),
                         width=TILE, height=TILE, downsample=2.0)
            for _ in range(n)]


def real_tiles(shared: Path) -> dict[str, list[np.ndarray]]:
    out = {}
    crchp = sorted((shared / "he-crchp" / "images").glob("*.jpg"))[:30]
    if crchp:  # 0.55 µm/px → 0.5
        out["crchp H&E"] = [np.asarray(Image.open(p).convert("RGB").resize((550, 550)))
                            [:TILE, :TILE] for p in crchp]
    svs = shared / "slides" / "CMU-1-Small-Region.svs"
    if svs.exists():
        from tilscore.slide import open_slide

        with open_slide(svs) as s:
            w, h = s.dimensions
            out["CMU svs"] = [s.read(x, y, width=TILE, height=TILE, mpp=0.5)
                              for y in range(400, h - 600, 500)
                              for x in range(200, w - 600, 500)]
    ihc = sorted((shared / "ihc-ki67-deepliif" / "images").glob("*.png"))
    if ihc:  # 0.25 µm/px → 0.5
        out["deepliif IHC"] = [np.asarray(Image.open(p).convert("RGB").resize((TILE, TILE)))
                               for p in ihc]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()

    def report(name: str, v: np.ndarray) -> None:
        v = v[~np.isnan(v)]
        if v.size:
            p = np.percentile(v, [0, 10, 50, 90, 100])
            print(f"{name:34s} n={v.size:3d}  " + "  ".join(f"{x:.4f}" for x in p))

    print("variance of Laplacian (grey 0-1) at 0.5 µm/px: min p10 p50 p90 max")
    for stain in ("he", "cd20", "foxp3"):
        for s in (0.0, 2.0, 4.0):
            report(f"synthetic {stain} defocus {s:g} px@0.25", measure(synthetic(stain, s)))
    for name, tiles in real_tiles(args.shared).items():
        report(f"{name} sharp", measure(tiles))
        for s in (1.0, 2.0):
            report(f"{name} blurred {s:g} px@0.5", measure([blur(t, s) for t in tiles]))


if __name__ == "__main__":
    main()
