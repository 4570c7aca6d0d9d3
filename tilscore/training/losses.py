"""Training losses: regions (cross-entropy + Dice, ignore label), cell-centre heatmaps
(CenterNet penalty-reduced focal loss), lymphocyte-nucleus mask (BCE + Dice).

Tensors: logits float (B, C, H, W); targets from :mod:`tilscore.targets` batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilscore.training.targets import IGNORE


def region_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over classes; `target` long (B, H, W), IGNORE = no loss."""
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target.clamp_max(logits.shape[1] - 1).masked_fill(~valid, 0),
                         reduction="none")
    ce = (ce * valid).sum() / valid.sum()
    probs = logits.softmax(dim=1) * valid[:, None]
    onehot = F.one_hot(target.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot * valid[:, None]
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    return ce + (dice[present].mean() if present.any() else 0.0)


def heatmap_focal_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor,
                       alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet focal loss. `target` float (B, C, H, W) with exactly 1 at cell centres and a
    Gaussian around; `weight` float (B, 1, H, W) in [0, 1] (0 = ignore: unlabelled nuclei,
    or samples without cell labels)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0).float() * weight
    neg = (1 - (target >= 1.0).float()) * weight
    pos_loss = -(torch.log(p) * (1 - p) ** alpha * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**alpha * (1 - target) ** beta * neg).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp_min(1.0)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice for the nucleus mask; logits/target/weight float (B, H, W)."""
    if weight.sum() == 0:
        return logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    bce = (bce * weight).sum() / weight.sum()
    p = torch.sigmoid(logits.float()) * weight
    t = target * weight
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return bce + dice
