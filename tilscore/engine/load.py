"""What stays loaded across slides: the model(s), their cards, the device and predictors
(:class:`Engine`); which model a stain and mode use (reading only cards, so a batch
client decides what to skip without weights); :func:`config_hash`, the resume key of
everything besides the model that changes a slide's numbers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from tilscore import __version__
from tilscore.engine.fast import DEFAULT_REGION_MODEL
from tilscore.engine.infer import Predictor, configure_cpu_threads, select_device, usable_cores
from tilscore.errors import UsageError
from tilscore.models import ModelCard, load_model
from tilscore.models.registry import MODELS_DIR, read_card, resolve_model_dir
from tilscore.scoring.score import REGION_CLASSES, ScoreConfig
from tilscore.scoring.slide_score import ihc_rule_params
from tilscore.scoring.tissue_only import NO_MODEL, TissueOnlyNet, tissue_only_card

DEFAULT_MODELS = {"he": "he-default", "cd20": "ihc-default", "foxp3": "ihc-default"}
MODES = ("full", "fast")


@dataclass
class Engine:
    """What stays loaded across slides: the model's card, the device, the predictor;
    in the fast mode also the region model's predictor (`regions`, tilscore.fast)."""

    card: ModelCard
    device: torch.device
    predictor: Predictor
    cores: int = 1  # CPU cores this engine may use (torch threads on CPU, tile decoding)
    regions: Predictor | None = None  # the region model's (fast mode), else None

    @property
    def mode(self) -> str:
        return "full" if self.regions is None else "fast"

    @property
    def region_card(self) -> ModelCard | None:
        """The fast mode's region model card (None in the full mode)."""
        return None if self.regions is None else self.regions.card

    @classmethod
    def load(cls, model: str | None, stain: str, *, device: str = "auto",
             cpu_threads: int | None = None, compile_model: bool | str = False,
             mode: str = "full", region_model: str | None = None) -> Engine:
        """`model`: a name or folder (None: the stain's default; "none": no compartment
        model); `cpu_threads`: cores this engine may use (None: every usable core);
        `compile_model`: torch.compile the network and its decoding (True, or a
        torch.compile mode such as ``reduce-overhead``: CUDA graphs; see
        docs/benchmarks.md); `mode`: ``full`` or ``fast`` (H&E: `region_model` for pass 1,
        default he-regions)."""
        dev = select_device(device)
        if dev.type == "cpu":
            configure_cpu_threads(threads=cpu_threads)
        card = model_card(model, stain)  # a clear error before any weights are read
        region_name = fast_region_model(mode, stain, region_model=region_model)
        net, card = (TissueOnlyNet(), card) if model == NO_MODEL else load_model(
            model or DEFAULT_MODELS[stain])
        regions = None
        if region_name is not None:
            rnet, rcard = load_model(region_name)
            regions = Predictor(rnet, rcard, dev, compile_model=compile_model)
        return cls(card, dev, Predictor(net, card, dev, compile_model=compile_model),
                   cpu_threads or usable_cores(), regions)


def fast_region_model(mode: str, stain: str, *, region_model: str | None = None) -> str | None:
    """The region model the fast mode runs (None in the full mode); checks the mode, the
    stain, and that the model takes H&E and has the region map's classes in order (reads
    only its card)."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "full":
        return None
    if stain != "he":
        raise UsageError(f"--mode fast is for H&E (stain he), not {stain!r}: on IHC every "
                         "cell is counted, so there is nothing to skip")
    name = region_model or DEFAULT_REGION_MODEL
    card = read_card(resolve_model_dir(name))
    if "he" not in card.stains:
        raise UsageError(f"region model {card.name} does not support H&E")
    if tuple(card.region_classes) != REGION_CLASSES:  # the region map's codes
        raise UsageError(f"region model {card.name}: its classes {list(card.region_classes)} "
                         f"are not {list(REGION_CLASSES)} in that order")
    return name


def model_card(model: str | None, stain: str) -> ModelCard:
    """The card of `model` (None: the stain's default; "none": no compartment model,
    :mod:`tilscore.tissue_only`), checked to support `stain`; reads only card.json, so a
    batch client can decide what to skip without weights."""
    if model == NO_MODEL:
        return tissue_only_card(stain)
    name = model or DEFAULT_MODELS[stain]
    if model is None and not (MODELS_DIR / name / "card.json").exists():
        shipped = sorted(p.parent.name for p in MODELS_DIR.glob("*/card.json"))
        raise UsageError(f"no default model for stain {stain!r} is installed "
                         f"(shipped: {', '.join(shipped) or 'none'}); pass --model")
    card = read_card(resolve_model_dir(name))
    if stain not in card.stains:
        raise UsageError(f"model {card.name} does not support stain {stain!r} "
                         f"(it supports: {', '.join(card.stains)})")
    return card


def config_hash(card: ModelCard, stain: str, *, cfg: ScoreConfig,
                region_card: ModelCard | None = None) -> str:
    """Short hash of everything that changes a slide's numbers besides the slide itself
    (the model is identified separately by its sha256); `region_card`: the fast mode's
    region model (None: the full mode)."""
    key = {"stain": stain, "score": cfg.__dict__, "tile_px": card.tile_px,
           "overlap_px": card.overlap_px, "input_mpp": card.input_mpp,
           "heatmap": card.heatmap.model_dump(), "tilscore": __version__}
    if region_card is not None:
        key["fast"] = {"region_model": region_card.sha256}
    if stain != "he":  # the IHC cell rule's constants change the counts too
        key["ihc"] = asdict(ihc_rule_params(stain, cfg))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
