"""IHC scoring without a compartment model (``--model none``): densities over all tissue.

When no compartment model applies to a slide (an unusual stain or tissue the shipped
``ihc-default`` was not made for), the positive cells are still counted by the IHC cell
rule over the tissue mask, and only the ``tissue`` compartment is reported: the summary
says so and leaves tumour and stroma null. No network runs: a stand-in "model" returns
region logits that make every pixel background, which the region canvas turns into
``other`` inside the tissue mask (:class:`tilscore.stitch.RegionCanvas`), so tiling,
cell detection, stitching and every output are the engine's own.
"""

from __future__ import annotations

import torch

from tilscore import __version__
from tilscore.errors import UsageError
from tilscore.models.card import ModelCard
from tilscore.scoring.score import REGION_CLASSES

NO_MODEL = "none"  # the --model value


def tissue_only_card(stain: str):
    """The :class:`~tilscore.models.card.ModelCard` of the no-model engine for an IHC
    `stain` (UsageError for H&E, whose cells need the network)."""
    if stain == "he":
        raise UsageError("--model none is for IHC stains (cd20, foxp3): on H&E the "
                         "lymphocytes come from the network")
    return ModelCard(name=NO_MODEL, version=__version__, architecture=NO_MODEL,
                     stains=(stain,), region_classes=REGION_CLASSES, cell_classes=(),
                     nucleus_mask=False, sha256=NO_MODEL,
                     training={"description": "no network: no compartments; cells from "
                                              "the IHC cell rule over the tissue mask"})


class TissueOnlyNet(torch.nn.Module):
    """Region logits (B, 4, H, W), all zero: argmax is class 0 (background) everywhere,
    which the tissue mask makes ``other`` inside tissue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return torch.zeros((b, len(REGION_CLASSES), h, w), dtype=torch.float32,
                           device=x.device)
