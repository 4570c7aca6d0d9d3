"""The model card: everything needed to run a model correctly and to cite it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tilscore.errors import UsageError
from tilscore.io.atomic import write_text

ClassName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_ -]{0,63}$")]
Positive = Annotated[float, Field(gt=0)]


class HeatmapSpec(BaseModel):
    """Cell-centre heatmap decoding: Gaussian targets of `sigma_um`, peaks by max-pool NMS
    within `nms_radius_um`, kept above `threshold` (sigmoid probability)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    sigma_um: float = Field(1.5, gt=0, le=50)
    nms_radius_um: float = Field(3.0, gt=0, le=100)
    threshold: float = Field(0.4, ge=0, le=1)


class ModelCard(BaseModel):
    """Stored as ``card.json`` beside the weights."""

    # Every value is range-checked when the card is read (before any slide runs): a card
    # is configuration, and an absurd tile size or pixel size would allocate absurdly.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(),
                              allow_inf_nan=False)
    name: str
    version: str = "0.1.0"
    architecture: str
    architecture_kwargs: dict = Field(default_factory=dict)
    stains: tuple[str, ...] = ("he",)
    input_mpp: float = Field(0.5, ge=0.05, le=20)  # the slide mpp range (slide.base)
    tile_px: int = Field(512, ge=32, le=8192)
    overlap_px: int = Field(32, ge=0, le=2048)
    # Names become CSV values, GeoJSON classes and OME-Zarr labels: plain words only.
    region_classes: tuple[ClassName, ...] = ("background", "tumour", "stroma", "other")
    cell_classes: tuple[ClassName, ...] = ("lymphocyte", "other")
    nucleus_mask: bool = True  # extra channel: lymphocyte-nucleus segmentation logits
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[Positive, Positive, Positive] = (0.25, 0.25, 0.25)
    heatmap: HeatmapSpec = HeatmapSpec()
    weights_file: str = Field("weights.safetensors", pattern=r"^[^/\\]+$")  # beside the card
    # How the weights are stored (always computed in float32/bf16): float16, float32, or
    # int8 = convolution/linear weights as int8 with a float32 scale per output channel
    # (symmetric), everything else float16 (registry.save_model).
    weights_storage: Literal["float32", "float16", "int8"] = "float16"
    sha256: str | None = None
    training: dict = Field(default_factory=dict)
    metrics: dict = Field(default_factory=dict)
    licence: str = "Apache-2.0"

    @model_validator(mode="after")
    def _overlap_inside_tile(self):
        if 2 * self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px {self.overlap_px} leaves no tile core: it must be "
                             f"less than half of tile_px {self.tile_px}")
        return self

    @property
    def out_channels(self) -> int:
        return len(self.region_classes) + len(self.cell_classes) + int(self.nucleus_mask)

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise UsageError(f"model card not found: {path}") from exc
        except (ValueError, ValidationError) as exc:  # JSON, UTF-8, values
            first = str(exc).splitlines()
            detail = " ".join(first[:3]) if first else type(exc).__name__
            raise UsageError(f"invalid model card {path}: {detail}") from exc

    def write(self, path: str | Path) -> None:
        write_text(path, self.model_dump_json(indent=2) + "\n")
