"""Training and validation loops as plain functions (torchvision references style).

``train(config, out_dir)`` builds the model from the registry, streams augmented
labelled tiles (see :mod:`tilscore.data`), optimises region + heatmap + nucleus losses
with AdamW and a warm-up + cosine schedule (bf16 autocast on CUDA), validates every
``val_every`` steps with the lymphocyte detection F1, keeps the best weights, stops
early when F1 stops improving, checkpoints every ``checkpoint_every`` steps (``--resume``
continues from there), logs metrics to ``metrics.csv`` and finally writes
``weights.safetensors`` + ``card.json`` into `out_dir`.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from tilscore.engine.infer import select_device
from tilscore.errors import UsageError
from tilscore.models import ModelCard, create_model, save_model
from tilscore.training.losses import heatmap_focal_loss, mask_loss, region_loss
from tilscore.training.train_config import TrainConfig

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5 % of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def init_heatmap_bias(model, card: ModelCard, prior: float = 0.01) -> None:
    """Start cell heatmaps at a low probability everywhere (CenterNet): without it the
    focal loss begins dominated by millions of easy negatives at p = 0.5."""
    r, c = len(card.region_classes), len(card.cell_classes)
    if c == 0:  # a region-only model
        return
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.bias[r : r + c].fill_(math.log(prior / (1 - prior)))


def compute_losses(logits: torch.Tensor, batch: dict, card: ModelCard, weights) -> dict:
    r, c = len(card.region_classes), len(card.cell_classes)
    parts = {"region": region_loss(logits[:, :r].float(), batch["region"])}
    if c:
        parts["heat"] = heatmap_focal_loss(logits[:, r : r + c], batch["heat"],
                                           batch["heat_weight"])
    if card.nucleus_mask:
        parts["nucleus"] = mask_loss(logits[:, r + c], batch["nucleus"], batch["nucleus_weight"])
    parts["total"] = sum(getattr(weights, k) * v for k, v in parts.items())
    return parts


def evaluate_detection(model, card: ModelCard, val_sets: dict[str, list],
                       device: torch.device, radius_um: float = 3.3) -> dict:
    """Validation metrics per set (``sets``: name → :func:`tilscore.eval_model.evaluate_model`)
    and their mean over the labs: a threshold sweep averaged over the sets (each set
    weighs the same, so the calibrated threshold holds across labs and scanners, not
    only on the largest set), its ``best_threshold``, and the mean ``dice_*`` and
    ``region_*`` figures. Synthetic tiles enter the means only when there is no real set.
    The model is left in training mode."""
    from tilscore.training.eval_model import evaluate_model, pick_threshold

    per_set = {name: evaluate_model(model, card, tiles, device, radius_um)
               for name, tiles in val_sets.items()}
    model.train()
    real = [m for name, m in per_set.items() if name != "synthetic"] or list(per_set.values())
    sweeps = [m["sweep_f1"] for m in real if m["sweep_f1"]]
    result: dict = {"sets": per_set, "sweep_f1": {}}
    if sweeps:
        result["sweep_f1"] = {t: float(np.mean([sw[t] for sw in sweeps])) for t in sweeps[0]}
        result["best_threshold"] = pick_threshold(result["sweep_f1"])
        result["lymphocyte_f1"] = result["sweep_f1"][result["best_threshold"]]
    for key in sorted({k for m in real for k, v in m.items() if isinstance(v, float)
                       and k.startswith(("dice_", "region_"))}):
        values = [m[key] for m in real if key in m]
        result[key] = float(np.mean(values))
    return result


def _save_checkpoint(path: Path, model, opt, sched, step: int, best: dict) -> None:
    import json

    from tilscore.io.atomic import atomic_path

    # Plain JSON types only, so torch.load(weights_only=True) can read it back.
    best = json.loads(json.dumps(best, default=float))
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "step": step, "best": best}, tmp)


def _selection_score(val: dict, val_f1: float, select_by: str) -> float:
    """What "best weights" means: lymphocyte F1 (at the best threshold), the mean Dice of
    tumour and stroma (a compartment model such as ihc-default), or the mean of the
    lymphocyte F1 and the region's balanced accuracy at typed nuclei (both heads)."""
    if select_by == "region_dice":
        return (val.get("dice_tumour", 0.0) + val.get("dice_stroma", 0.0)) / 2
    if select_by == "f1_and_regions":
        return (val_f1 + val.get("region_balanced_accuracy", 0.0)) / 2
    return val_f1


def _init_from(model, card: ModelCard, source: str) -> None:
    """Start from the weights of model `source` (fine-tuning); it must have the same
    architecture. When the outputs differ (e.g. a region-only model from he-default), the
    output head keeps its random initialisation and everything else is copied."""
    from tilscore.models import load_model

    net, src = load_model(source)
    if (src.architecture, src.architecture_kwargs) != (card.architecture,
                                                       card.architecture_kwargs):
        raise UsageError(f"init_from {source}: its architecture {src.architecture} "
                         f"{src.architecture_kwargs} does not match {card.architecture} "
                         f"{card.architecture_kwargs}")
    own = model.state_dict()
    copied = {k: v.float() for k, v in net.state_dict().items() if v.shape == own[k].shape}
    model.load_state_dict({**own, **copied})
    log.info("initialised from %s (%d of %d tensors; %s)", src.name, len(copied), len(own),
             "head re-initialised" if len(copied) < len(own) else "all")


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
          device: str | None = None, max_steps: int | None = None,
          progress: bool = True) -> ModelCard:
    """Train per `cfg`; returns the card of the best weights written to `out_dir`."""
    from tilscore.training.data import build_datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    dev = select_device(device or cfg.device)
    steps = int(max_steps or cfg.max_steps)
    card = cfg.model_card()
    model = create_model(card.architecture, card.out_channels, card.mean, card.std,
                         **card.architecture_kwargs)
    if cfg.init_from:
        _init_from(model, card, cfg.init_from)
    else:
        init_heatmap_bias(model, card)
    model = model.to(dev).to(memory_format=torch.channels_last)
    train_ds, val_tiles, data_info = build_datasets(cfg)
    if not val_tiles:
        log.warning("no validation tiles: early stopping disabled")
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0, pin_memory=dev.type == "cuda",
        worker_init_fn=_worker_seed,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, steps))
    step, best = 0, {"f1": -1.0, "step": 0, "metrics": {}}
    ckpt = out_dir / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise UsageError(f"--resume: no checkpoint in {out_dir}")
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = int(state["step"]), state["best"]
        if best.get("metrics"):  # the selection rule may differ from the first run's
            best["score"] = _selection_score(best["metrics"], best["f1"], cfg.select_by)
        log.info("resumed from step %d", step)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics_path = out_dir / "metrics.csv"  # one row per step; validation.csv per validation
    from tilscore.engine.infer import bf16_is_native

    use_bf16 = bf16_is_native(dev)  # CUDA, or a CPU with native bf16 (2-3x faster steps)
    bar = _progress(steps, step, progress)
    stale = 0
    t0 = time.perf_counter()
    model.train()
    data_iter = iter(loader)
    while step < steps:
        batch = {k: v.to(dev, non_blocking=True) for k, v in next(data_iter).items()}
        images = batch["image"].permute(0, 3, 1, 2)  # NHWC uint8 → channels_last NCHW
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(images)
        parts = compute_losses(logits.float(), batch, card, cfg.loss_weights)
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        step += 1
        row = {"step": step, "lr": sched.get_last_lr()[0],
               **{f"loss_{k}": float(v.detach()) for k, v in parts.items()},
               "elapsed_s": round(time.perf_counter() - t0, 1)}
        if val_tiles and (step % cfg.val_every == 0 or step == steps):
            val = evaluate_detection(model, card, val_tiles, dev, cfg.match_radius_um)
            _append_metrics(out_dir / "validation.csv", {
                "step": step, **{k: v for k, v in val.items() if not isinstance(v, dict)},
                **{f"{name}.{k}": v for name, m in val["sets"].items() for k, v in m.items()
                   if not isinstance(v, dict)},
                "best_f1": max(val["sweep_f1"].values(), default=0.0)})
            val_f1 = max(val["sweep_f1"].values(), default=0.0)  # at the best threshold
            score = _selection_score(val, val_f1, cfg.select_by)
            if score > best.get("score", best["f1"]):
                best = {"f1": val_f1, "score": score, "step": step, "metrics": val}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                stale = 0
            else:
                stale += 1
            log.info("step %d: val F1 %.3f (best threshold %s), selection score %.3f "
                     "(best %.3f @ %d)", step, val_f1, val.get("best_threshold"), score,
                     best.get("score", best["f1"]), best["step"])
        _append_metrics(metrics_path, row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total'].item():.3f}", best_f1=f"{best['f1']:.3f}")
        if step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, model, opt, sched, step, best)
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            log.info("early stopping at step %d (no F1 gain in %d validations)", step, stale)
            break
    if bar is not None:
        bar.close()
    if not val_tiles:
        best_state = model.state_dict()
    model.load_state_dict(best_state)
    if val_tiles and card.cell_classes:  # the peak threshold is calibrated, not guessed
        best_thr = best["metrics"].get("best_threshold", card.heatmap.threshold)
        card = card.model_copy(update={"heatmap": card.heatmap.model_copy(
            update={"threshold": best_thr})})
        best["metrics"] = evaluate_detection(model, card, val_tiles, dev, cfg.match_radius_um)
    card = card.model_copy(update={
        "training": {**card.training, **data_info, "init_from": cfg.init_from,
                     "steps": step, "best_step": best["step"],
                     "seconds": round(time.perf_counter() - t0, 1), "device": str(dev),
                     "precision": "bfloat16" if use_bf16 else "float32",
                     "config": cfg.model_dump(mode="json")},
        "metrics": {"validation": best["metrics"]},
    })
    return save_model(model.cpu(), card, out_dir, storage=cfg.weights_storage)


def _worker_seed(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _append_metrics(path: Path, row: dict) -> None:
    """One row under the file's header (the first row's keys): a key a later row lacks is
    left empty and one the header lacks is dropped, so columns never shift."""
    new = not path.exists()
    if new:
        fields = list(row)
    else:
        with open(path, newline="") as fh:
            fields = next(csv.reader(fh), list(row))
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
