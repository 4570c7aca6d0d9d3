"""Explicit architecture registry and safetensors load/save with sha256 checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tilscore.errors import UsageError
from tilscore.io.atomic import atomic_path
from tilscore.models.architectures import ARCHITECTURES
from tilscore.models.card import ModelCard

# Shipped models: <models dir>/<name>/{card.json, weights.safetensors}.
# Shipped models sit beside the package in a source checkout; an installed copy (Docker,
# a wheel) points TILSCORE_MODELS_DIR at its models/ folder.
MODELS_DIR = Path(os.environ.get("TILSCORE_MODELS_DIR")
                  or Path(__file__).resolve().parents[2] / "models")


def create_model(name: str, out_channels: int, *, mean=(0.5,) * 3, std=(0.25,) * 3, **kwargs):
    """Build architecture `name` (random init) wrapped to take uint8 NCHW input.

    Returns a :class:`tilscore.models.net.TilNet`; its output is float logits
    (B, out_channels, H, W).
    """
    if name not in ARCHITECTURES:
        raise UsageError(f"unknown model architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    # lazy: torch, timm and torchvision take seconds to import, and reading or hashing a
    # card (engine.load.model_card, `tilscore model-hash`) needs none of them
    import segmentation_models_pytorch as smp

    from tilscore.models.net import TilNet

    cls_name, defaults = ARCHITECTURES[name]
    params = {**defaults, **kwargs}
    if "decoder_channels" in params:
        params["decoder_channels"] = tuple(params["decoder_channels"])
    backbone = getattr(smp, cls_name)(
        encoder_weights=None, in_channels=3, classes=out_channels, **params
    )
    return TilNet(backbone, mean=mean, std=std)


def model_from_card(card: ModelCard):
    return create_model(card.architecture, card.out_channels, mean=card.mean, std=card.std,
                        **card.architecture_kwargs)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A folder path with card.json, or the name of a shipped model under models/."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "card.json").exists():
        return path
    if path.suffix == ".json" and path.is_file():
        return path.parent
    shipped = MODELS_DIR / str(name_or_path)
    if (shipped / "card.json").exists():
        return shipped
    available = sorted(p.name for p in MODELS_DIR.glob("*/card.json") for p in [p.parent])
    raise UsageError(
        f"unknown model {str(name_or_path)!r}: not a folder with card.json nor a shipped model "
        f"(shipped: {', '.join(available) or 'none'})"
    )


HASH_COMMAND = "tilscore model-hash"


def read_card(folder: Path) -> ModelCard:
    """The card of the model in `folder`, which must name its weights' sha256: without it
    corrupt or swapped weights would load unchecked and score silently (UsageError naming
    the command that adds it)."""
    card = ModelCard.read(folder / "card.json")
    if not card.sha256:
        raise UsageError(f"model {card.name}: {folder / 'card.json'} has no sha256 of its "
                         f"weights, so they cannot be checked; add it with: "
                         f"{HASH_COMMAND} {folder}")
    return card


def write_card_sha256(folder: str | Path, force: bool = False) -> tuple[ModelCard, str]:
    """Write the sha256 of the weights in model `folder` into its card.json: (the card,
    what was done: "written", "unchanged" or "replaced"). A card whose hash differs from
    the weights is a UsageError unless `force` (the weights may be corrupt)."""
    folder = resolve_model_dir(folder)
    card = ModelCard.read(folder / "card.json")
    weights = folder / card.weights_file
    if not weights.is_file():
        raise UsageError(f"model {card.name}: weights file missing: {weights}")
    digest = file_sha256(weights)
    if card.sha256 == digest:
        return card, "unchanged"
    if card.sha256 and not force:
        raise UsageError(f"model {card.name}: card.json says sha256 {card.sha256[:12]}… but "
                         f"{weights.name} is {digest[:12]}…: the weights are corrupt or "
                         "belong to another card (--force replaces the card's hash)")
    done = "replaced" if card.sha256 else "written"
    card = card.model_copy(update={"sha256": digest})
    card.write(folder / "card.json")
    return card, done


def load_model(name_or_path: str | Path):
    """Load (model in eval mode on CPU, card). Checks the weights' sha256 and shapes."""
    import torch  # lazy: as in create_model
    from safetensors.torch import load_file  # lazy: imports torch

    folder = resolve_model_dir(name_or_path)
    card = read_card(folder)
    weights = folder / card.weights_file
    if not weights.exists():
        raise UsageError(f"model {card.name}: weights file missing: {weights}")
    digest = file_sha256(weights)
    if digest != card.sha256:
        raise UsageError(
            f"model {card.name}: weights sha256 {digest[:12]}… does not match the card "
            f"({card.sha256[:12]}…); the file is corrupt or belongs to another card"
        )
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types on bad headers
        raise UsageError(f"model {card.name}: {weights.name} is not a valid safetensors "
                         f"file ({str(exc).splitlines()[0]})") from exc
    state = dequantize(state)
    model = model_from_card(card)
    expected = model.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if mismatched or missing or unexpected:
        what = (f"shape mismatch in {mismatched[0]}" if mismatched
                else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise UsageError(
            f"model {card.name}: weights do not match architecture {card.architecture} ({what})"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval()
    card = card.model_copy(update={"sha256": digest})
    return model.to(memory_format=torch.channels_last), card


INT8_SCALE = ".int8_scale"  # key suffix of the per-output-channel scales of int8 weights


def quantize_int8(state: dict) -> dict:
    """Weights of ≥ 2 dimensions (convolutions, linear) → int8 with a float32 scale per
    output channel (symmetric: w ≈ q · scale, |q| ≤ 127); other floats → float16."""
    import torch  # lazy: as in create_model

    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
        elif v.ndim >= 2:
            w = v.float()
            amax = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
            scale = amax / 127.0
            shape = (-1,) + (1,) * (w.ndim - 1)
            out[k] = torch.round(w / scale.view(shape)).clamp(-127, 127).to(torch.int8)
            out[k + INT8_SCALE] = scale
        else:
            out[k] = v.half()
    return out


def dequantize(state: dict) -> dict:
    """Inverse of :func:`quantize_int8` (float32 weights); other states pass unchanged."""
    out = {}
    for k, v in state.items():
        if k.endswith(INT8_SCALE):
            continue
        scale = state.get(k + INT8_SCALE)
        out[k] = v if scale is None else v.float() * scale.view((-1,) + (1,) * (v.ndim - 1))
    return out


def save_model(model, card: ModelCard, *, folder: str | Path, half: bool = True,
               storage: str | None = None) -> ModelCard:
    """Write weights.safetensors and card.json with its sha256. `storage`: "float32",
    "float16" or "int8" (see :func:`quantize_int8`); None: float16 when `half`."""
    from safetensors.torch import save_file  # lazy: imports torch (as in create_model)

    storage = storage or ("float16" if half else "float32")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if storage == "int8":
        state = quantize_int8(state)
    elif storage == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    elif storage != "float32":
        raise UsageError(f"unknown weights storage {storage!r}; valid: float32, float16, int8")
    with atomic_path(folder / card.weights_file) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    card = card.model_copy(update={"weights_storage": storage,
                                   "sha256": file_sha256(folder / card.weights_file)})
    card.write(folder / "card.json")
    return card
