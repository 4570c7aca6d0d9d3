"""Training configuration (YAML values → a frozen pydantic model; unknown keys rejected)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tilscore.errors import UsageError
from tilscore.models.card import HeatmapSpec, ModelCard
from tilscore.yaml_config import read_yaml_mapping


class DataSource(BaseModel):
    """One training source: ``synthetic`` (generated in code) or a labelled-tile folder in
    any supported format (``auto`` detects it). ``weight``: sampling share."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = "auto"
    path: str | None = None
    stain: str = "he"
    weight: float = 1.0
    val_fraction: float = 0.15
    mpp: float | None = None  # override for folders without mpp
    scenes: int = 12  # synthetic: distinct training layouts
    val_tiles: int = 16  # synthetic: validation tiles (from held-out layouts)
    scene_px: int = 3072  # synthetic: scene side in level-0 px (0.25 µm/px)


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    region: float = 1.0
    heat: float = 1.0
    nucleus: float = 0.5


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "he-default"
    version: str = "0.1.0"
    architecture: str = "unet-resnet18"
    architecture_kwargs: dict = Field(default_factory=dict)
    stains: tuple[str, ...] = ("he",)
    input_mpp: float = 0.5
    tile_px: int = 512  # inference tile (card); training crops are crop_px
    overlap_px: int = 32
    crop_px: int = 256
    cell_classes: tuple[str, ...] = ("lymphocyte", "other")  # () = a region-only model
    nucleus_mask: bool = True  # lymphocyte-nucleus channel (False for a region-only model)
    region_classes: tuple[str, ...] = ("background", "tumour", "stroma", "other")
    heatmap: HeatmapSpec = HeatmapSpec()
    data: tuple[DataSource, ...] = (DataSource(kind="synthetic"),)
    max_steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    val_every: int = 200
    checkpoint_every: int = 200
    early_stopping_patience: int = 6
    match_radius_um: float = 3.3
    loss_weights: LossWeights = LossWeights()
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    augment: bool = True
    # How the best weights are stored (registry.save_model): int8 keeps the shipped models
    # at half the float16 size with unchanged metrics (models/*/card.json, int8_storage).
    weights_storage: Literal["float32", "float16", "int8"] = "float16"
    lymphocyte_radius_um: float = 3.5  # weak nucleus masks: ~7 µm lymphocyte nucleus
    init_from: str | None = None  # model name/folder to fine-tune (same architecture)
    # Exponential moving average of the weights (and BatchNorm statistics), validated and
    # saved instead of the raw weights, as torchvision's references' --model-ema; None = off.
    # Smooths the step-to-step noise of small-batch CPU training (docs/accuracy.md).
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    # best weights: lymphocyte F1, tumour/stroma Dice, or the mean of lymphocyte F1 and
    # the region's balanced accuracy at typed nuclei (tilscore.train._selection_score)
    select_by: Literal["lymphocyte_f1", "region_dice", "f1_and_regions", "regions"] = (
        "lymphocyte_f1")

    @model_validator(mode="after")
    def _region_only_selects_by_dice(self):
        if "lymphocyte" not in self.cell_classes and self.select_by not in ("region_dice",
                                                                            "regions"):
            raise ValueError("a model without a lymphocyte class needs select_by: region_dice "
                             "or regions")
        return self

    def model_card(self) -> ModelCard:
        return ModelCard(
            name=self.name, version=self.version, architecture=self.architecture,
            architecture_kwargs=self.architecture_kwargs, stains=self.stains,
            input_mpp=self.input_mpp, tile_px=self.tile_px, overlap_px=self.overlap_px,
            region_classes=self.region_classes, cell_classes=self.cell_classes,
            nucleus_mask=self.nucleus_mask, heatmap=self.heatmap,
        )


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    """Read YAML `path`, apply non-None `overrides`; errors name the file and the key."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"{path}: {where}: {err['msg']}") from exc
