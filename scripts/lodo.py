"""Leave-one-dataset-out: train a recipe without one labelled set, then test on all of it.

    .venv/bin/python scripts/lodo.py --leave-out he-consep [--config configs/train_he.yaml]
        [--out runs/lodo-he-consep] [--max-steps N] [--resume] [--eval-only]

The model never sees an image of the left-out lab or scanner, and its peak threshold is
calibrated on the remaining sets' validation splits, as the shipped model's is; so the
figures say how the recipe does on a lab it has never seen. Prints and writes
``OUT/lodo.json``: the left-out set's lymphocyte P/R/F1 at that threshold, the best F1 of
the threshold sweep (what a threshold calibrated on the left-out lab itself would give),
and the region at typed nuclei (balanced accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tilscore.errors import TilscoreError  # noqa: E402


def run(config: Path, leave_out: str, out: Path, max_steps: int | None, resume: bool,
        eval_only: bool) -> dict:
    import torch

    from tilscore.errors import UsageError
    from tilscore.models import load_model
    from tilscore.training.eval_data import eval_tiles
    from tilscore.training.eval_model import evaluate_model
    from tilscore.training.train import train
    from tilscore.training.train_config import load_train_config

    cfg = load_train_config(config)
    kept = tuple(d for d in cfg.data if not (d.path and Path(d.path).name == leave_out))
    left = [d for d in cfg.data if d.path and Path(d.path).name == leave_out]
    if not left:
        names = ", ".join(Path(d.path).name for d in cfg.data if d.path)
        raise UsageError(f"--leave-out {leave_out}: not a data source of {config} ({names})")
    cfg = cfg.model_copy(update={"data": kept, "name": f"{cfg.name}-without-{leave_out}"})
    if not eval_only:
        train(cfg, out, resume=resume, max_steps=max_steps)
    net, card = load_model(out)
    tiles = eval_tiles(left[0].path, card.input_mpp, split="all", mpp=left[0].mpp)
    metrics = evaluate_model(net, card, tiles=tiles, device=torch.device("cpu"),
                             radius_um=cfg.match_radius_um)
    best = metrics["best_threshold"]
    result = {
        "left_out": leave_out, "images": len(tiles), "trained_on": [d.path or d.kind
                                                                    for d in kept],
        "steps": card.training.get("steps"), "threshold": card.heatmap.threshold,
        **{k: metrics[k] for k in ("lymphocyte_precision", "lymphocyte_recall",
                                   "lymphocyte_f1")},
        "best_threshold_on_left_out": best, "best_f1_on_left_out": metrics["sweep_f1"][best],
        **{k: v for k, v in metrics.items() if k.startswith(("region_", "tumour_cell_"))},
    }
    (out / "lodo.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leave-out", required=True, help="folder name of the set to leave out")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "train_he.yaml")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="evaluate a trained OUT")
    args = ap.parse_args()
    out = args.out or REPO / "runs" / f"lodo-{args.leave_out}"
    try:
        result = run(args.config, args.leave_out, out, args.max_steps, args.resume,
                     args.eval_only)
    except TilscoreError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
