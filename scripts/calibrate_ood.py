"""The out-of-domain QC numbers (tilscore.scoring.qc: region uncertainty, tumour-class nuclei
inside tumour) on in-domain and out-of-domain H&E, to set and check QcConfig's limits.

    .venv/bin/python scripts/calibrate_ood.py [--model he-default] [--data ../shared/data]

In domain: the validation images of CRCHistoPhenotypes and CoNSeP (colorectal carcinoma
from two labs; scored as plain images at their µm/px) and a synthetic carcinoma slide.
Out of domain: CMU-1-Small-Region.svs (skin: epidermis, hair follicle, dermis). Prints a
markdown table: per input the fraction of uncertain tissue, the tumour-class nuclei and
the share of them inside tumour regions, and the QC flags raised.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def inputs(data: Path, tmp: Path) -> list[tuple[str, Path, float | None]]:
    """(group, path, mpp) of every input; the labelled sets' val images are read in place."""
    from tilscore.synth.writer import write_synthetic_slide
    from tilscore.training.importers import load_folder

    items = []
    for name, mpp in (("he-crchp", 0.55), ("he-consep", 0.2441)):
        for tile in load_folder(data / name):
            if tile.split == "val":
                items.append((name, Path(tile.source), mpp))
    synth = write_synthetic_slide(tmp / "synthetic.tiff", stain="he", seed=5,
                                  size_px=(4096, 4096), mpp=0.25).slide_path
    items.append(("synthetic", synth, None))
    items.append(("CMU-1 skin", data / "slides" / "CMU-1-Small-Region.svs", None))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="he-default")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from tilscore.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("| group | input | uncertain tissue | tumour-class nuclei | in tumour | flags |")
        print("|---|---|---|---|---|---|")
        for group, path, mpp in inputs(args.data, tmp):
            out = tmp / "out"
            argv = ["score", str(path), "--out", str(out), "--model", args.model,
                    "--device", args.device, "--quiet", "--no-report"]
            if mpp:
                argv += ["--mpp", str(mpp)]
            cli(argv)
            summary = json.loads((out / path.name.split(".")[0] / "summary.json").read_text())
            qc = summary["qc"]
            inside = qc.get("tumour_cells_in_tumour_fraction")
            flags = ", ".join(f["code"] for f in qc["flags"] if f["code"] != "mpp") or "—"
            print(f"| {group} | {path.name} | {qc.get('region_uncertain_fraction') or 0:.3f} | "
                  f"{qc.get('tumour_cells')} | "
                  f"{'—' if inside is None else f'{inside:.2f}'} | {flags} |")


if __name__ == "__main__":
    main()
