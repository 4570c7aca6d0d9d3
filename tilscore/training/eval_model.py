"""Evaluating a model on labelled tiles: lymphocyte detection P/R/F1 at a radius in µm
(predictions on unclassified nuclei ignored), a threshold sweep, a TIGER-style FROC and
region Dice per class where masks exist. Used by ``tilscore eval`` and by training."""

from __future__ import annotations

import numpy as np
import torch

from tilscore.engine.infer import find_peaks
from tilscore.training.importers.labelled import CELL_CODES
from tilscore.training.metrics import DetectionScore, detection_score, dice_per_class, froc

SWEEP = tuple(round(t, 2) for t in np.arange(0.1, 0.75, 0.05))


@torch.inference_mode()
def predict_tiles(model, card, *, tiles, device, batch_size: int = 8):
    """Per tile: (peaks float32 (N, 5) at the lowest sweep threshold, region argmax uint8).

    `tiles`: LabelledTile at the model mpp with sides divisible by 32.
    """
    model.eval()
    r, c = len(card.region_classes), len(card.cell_classes)
    kernel = 2 * max(1, round(card.heatmap.nms_radius_um / card.input_mpp)) + 1
    out = []
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        same = all(t.image.shape == chunk[0].image.shape for t in chunk)
        for group in ([chunk] if same else [[t] for t in chunk]):
            x = torch.from_numpy(np.stack([t.image for t in group])).to(device)
            logits = model(x.permute(0, 3, 1, 2)).float()
            peaks = (find_peaks(torch.sigmoid(logits[:, r : r + c]), kernel,
                                threshold=min(SWEEP)).cpu()
                     if c else torch.zeros((0, 5)))
            regions = logits[:, :r].argmax(1).to(torch.uint8).cpu().numpy()
            for k in range(len(group)):
                out.append((peaks[peaks[:, 0] == k].numpy(), regions[k]))
    return out


def evaluate_model(model, card, *, tiles, device, radius_um: float = 3.3) -> dict:
    """Metrics dict: ``lymphocyte_*`` at the card threshold, ``sweep`` {threshold: f1},
    ``best_threshold``, ``froc`` {fp_per_mm2: sensitivity}, ``dice_<region>``, the region
    at typed nuclei (:func:`region_at_nuclei`), ``tumour_cell_*`` when the card has a
    tumour class (a region-only model: the region metrics and an empty ``sweep_f1``)."""
    preds = predict_tiles(model, card, tiles=tiles, device=device)
    result = {"sweep_f1": {}, **_region_dice(preds, tiles, card),
              **region_at_nuclei([r for _, r in preds], tiles, card=card)}
    if "lymphocyte" not in card.cell_classes:
        return result
    lymph = card.cell_classes.index("lymphocyte")
    radius_px = radius_um / card.input_mpp

    def score_at(thr: float, cls: str = "lymphocyte") -> DetectionScore:
        total = DetectionScore(0, 0, 0)
        k = card.cell_classes.index(cls)
        for (peaks, _), tile in zip(preds, tiles, strict=True):
            mine = peaks[(peaks[:, 1] == k) & (peaks[:, 4] > thr)]
            truth = tile.points_xy[tile.point_cls == CELL_CODES[cls]]
            total = total + detection_score(mine[:, 2:4], truth, radius=radius_px,
                                            ignore_xy=tile.points_xy[tile.point_cls < 0])
        return total

    sweep = {thr: score_at(thr).f1 for thr in SWEEP}
    result.update({f"lymphocyte_{k}": v
                   for k, v in score_at(card.heatmap.threshold).as_dict().items()})
    result["threshold"] = card.heatmap.threshold
    result["sweep_f1"] = sweep
    result["best_threshold"] = pick_threshold(sweep)
    area_mm2 = sum(t.image.shape[0] * t.image.shape[1] for t in tiles) * (card.input_mpp
                                                                           * 1e-3) ** 2
    per_image = [(p[p[:, 1] == lymph][:, 2:4], p[p[:, 1] == lymph][:, 4],
                  t.points_xy[t.point_cls == CELL_CODES["lymphocyte"]])
                 for (p, _), t in zip(preds, tiles,
                                                                          strict=True)]
    result["froc_sensitivity_at_fp_per_mm2"] = froc(per_image, radius_px, area_mm2=max(area_mm2,
                                                                                       1e-9))
    if "tumour" in card.cell_classes and any((t.point_cls == CELL_CODES["tumour"]).any()
                                             for t in tiles):
        result.update({f"tumour_cell_{k}": v
                       for k, v in score_at(card.heatmap.threshold, "tumour").as_dict().items()})
    return result


def pick_threshold(sweep: dict[float, float]) -> float:
    """The threshold of the best F1 in `sweep` (ties: the one nearest 0.4)."""
    return max(sweep, key=lambda t: (sweep[t], -abs(t - 0.4)))


def region_at_nuclei(regions: list[np.ndarray], tiles, *, card) -> dict:
    """The predicted region under typed nuclei: the fraction of tumour (epithelial) nuclei
    in "tumour" and of stromal (fibroblast/spindle) nuclei in "stroma", and their mean,
    the balanced accuracy (empty when the tiles have no such nuclei).

    `regions`: uint8 (H, W) predicted region codes per tile, in the tile's pixels."""
    hits = {"tumour": [0, 0], "stroma": [0, 0]}
    for region, tile in zip(regions, tiles, strict=True):
        h, w = region.shape
        cols = np.clip(tile.points_xy[:, 0].astype(int), 0, w - 1)
        rows = np.clip(tile.points_xy[:, 1].astype(int), 0, h - 1)
        under = region[rows, cols]
        for name, code in (("tumour", CELL_CODES["tumour"]), ("stroma", CELL_CODES["stromal"])):
            mine = tile.point_cls == code
            hits[name][0] += int((under[mine] == card.region_classes.index(name)).sum())
            hits[name][1] += int(mine.sum())
    if not all(n for _, n in hits.values()):
        return {}
    frac = {k: hit / n for k, (hit, n) in hits.items()}
    return {"region_tumour_nuclei_in_tumour": frac["tumour"],
            "region_stromal_nuclei_in_stroma": frac["stroma"],
            "region_balanced_accuracy": (frac["tumour"] + frac["stroma"]) / 2,
            "region_typed_nuclei": {k: n for k, (_, n) in hits.items()}}


def _region_dice(preds, tiles, card) -> dict:
    """Mean Dice per region class over the tiles that have region masks."""
    result = {}
    dice: dict[int, list[float]] = {}
    for (_, regions), tile in zip(preds, tiles, strict=True):
        if tile.region is not None:
            for cls, d in dice_per_class(regions, tile.region,
                                         n_classes=len(card.region_classes)).items():
                dice.setdefault(cls, []).append(d)
    for cls, vals in sorted(dice.items()):
        result[f"dice_{card.region_classes[cls]}"] = float(np.mean(vals))
    return result
