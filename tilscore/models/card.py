"""The model card: everything needed to run a model correctly and to cite it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tilscore.errors import UsageError


class HeatmapSpec(BaseModel):
    """Cell-centre heatmap decoding: Gaussian targets of `sigma_um`, peaks by max-pool NMS
    within `nms_radius_um`, kept above `threshold` (sigmoid probability)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sigma_um: float = 1.5
    nms_radius_um: float = 3.0
    threshold: float = 0.4


class ModelCard(BaseModel):
    """Stored as ``card.json`` beside the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    name: str
    version: str = "0.1.0"
    architecture: str
    architecture_kwargs: dict = Field(default_factory=dict)
    stains: tuple[str, ...] = ("he",)
    input_mpp: float = 0.5
    tile_px: int = 512
    overlap_px: int = 32
    region_classes: tuple[str, ...] = ("background", "tumour", "stroma", "other")
    cell_classes: tuple[str, ...] = ("lymphocyte", "other")
    nucleus_mask: bool = True  # extra channel: lymphocyte-nucleus segmentation logits
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    heatmap: HeatmapSpec = HeatmapSpec()
    weights_file: str = "weights.safetensors"
    # How the weights are stored (always computed in float32/bf16): float16, float32, or
    # int8 = convolution/linear weights as int8 with a float32 scale per output channel
    # (symmetric), everything else float16 (registry.save_model).
    weights_storage: Literal["float32", "float16", "int8"] = "float16"
    sha256: str | None = None
    training: dict = Field(default_factory=dict)
    metrics: dict = Field(default_factory=dict)
    licence: str = "Apache-2.0"

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
        except (json.JSONDecodeError, ValidationError) as exc:
            first = str(exc).splitlines()
            detail = " ".join(first[:3]) if first else type(exc).__name__
            raise UsageError(f"invalid model card {path}: {detail}") from exc

    def write(self, path: str | Path) -> None:
        from tilscore.io.atomic import write_text

        write_text(path, self.model_dump_json(indent=2) + "\n")
