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
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tilscore.engine.infer import bf16_is_native, select_device
from tilscore.errors import UsageError
from tilscore.io.atomic import atomic_path
from tilscore.models import ModelCard, create_model, load_model, save_model
from tilscore.training.data import build_datasets
from tilscore.training.eval_model import evaluate_model, pick_threshold
from tilscore.training.losses import heatmap_focal_loss, mask_loss, region_loss
from tilscore.training.train_config import TrainConfig

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5 % of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def init_heatmap_bias(model, card: ModelCard, *, prior: float = 0.01) -> None:
    """Start cell heatmaps at a low probability everywhere (CenterNet): without it the
    focal loss begins dominated by millions of easy negatives at p = 0.5."""
    r, c = len(card.region_classes), len(card.cell_classes)
    if c == 0:  # a region-only model
        return
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.bias[r : r + c].fill_(math.log(prior / (1 - prior)))


def compute_losses(logits: torch.Tensor, batch: dict, *, card: ModelCard, weights) -> dict:
    r, c = len(card.region_classes), len(card.cell_classes)
    parts = {"region": region_loss(logits[:, :r].float(), batch["region"])}
    if c:
        parts["heat"] = heatmap_focal_loss(logits[:, r : r + c], batch["heat"],
                                           weight=batch["heat_weight"])
    if card.nucleus_mask:
        parts["nucleus"] = mask_loss(logits[:, r + c], batch["nucleus"],
                                     weight=batch["nucleus_weight"])
    parts["total"] = sum(getattr(weights, k) * v for k, v in parts.items())
    return parts


def evaluate(model, val_sets: dict[str, list], *, card: ModelCard, device: torch.device,
             radius_um: float = 3.3) -> dict:
    """Validation metrics per set (``sets``: name → :func:`tilscore.eval_model.evaluate_model`)
    and their mean over the labs: a threshold sweep averaged over the sets (each set
    weighs the same, so the calibrated threshold holds across labs and scanners, not
    only on the largest set), its ``best_threshold``, and the mean ``dice_*`` and
    ``region_*`` figures. Synthetic tiles enter the means only when there is no real set.
    The model is left in training mode."""
    per_set = {name: evaluate_model(model, card, tiles=tiles, device=device, radius_um=radius_um)
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


def _save_checkpoint(path: Path, model, opt, sched, step: int, best: dict,
                     ema=None) -> None:
    # Plain JSON types only, so torch.load(weights_only=True) can read it back.
    best = json.loads(json.dumps(best, default=float))
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "step": step, "best": best,
                    **({"ema": ema.state_dict()} if ema is not None else {})}, tmp)


def _selection_score(val: dict, val_f1: float, select_by: str) -> float:
    """What "best weights" means: lymphocyte F1 (at the best threshold), the mean Dice of
    tumour and stroma (a compartment model such as ihc-default), the mean of the
    lymphocyte F1 and the region's balanced accuracy at typed nuclei (both heads), or for
    a region model the mean of that balanced accuracy (real sets) and the synthetic
    tumour/stroma Dice (``regions``)."""
    if select_by == "region_dice":
        return (val.get("dice_tumour", 0.0) + val.get("dice_stroma", 0.0)) / 2
    if select_by == "regions":  # real typed nuclei and exact synthetic masks, equally
        synth = val.get("sets", {}).get("synthetic", {})
        parts = [val["region_balanced_accuracy"]] if "region_balanced_accuracy" in val else []
        if "dice_tumour" in synth:
            parts.append((synth["dice_tumour"] + synth.get("dice_stroma", 0.0)) / 2)
        return float(np.mean(parts)) if parts else 0.0
    if select_by == "f1_and_regions":
        return (val_f1 + val.get("region_balanced_accuracy", 0.0)) / 2
    return val_f1


def _init_from(model, card: ModelCard, source: str) -> None:
    """Start from the weights of model `source` (fine-tuning); it must have the same
    architecture. When the outputs differ (e.g. a region-only model from he-default), the
    output head keeps its random initialisation and everything else is copied."""
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


@dataclass
class TrainRun:
    """What one training run works with and carries from step to step (what
    :func:`_set_up` builds and a checkpoint saves and restores)."""

    cfg: TrainConfig
    card: ModelCard
    model: torch.nn.Module
    batches: Iterator[dict]  # endless stream of augmented training batches (host tensors)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    use_bf16: bool
    steps: int  # the last step
    val_tiles: dict[str, list]  # validation set name → tiles (empty: no validation)
    data_info: dict
    out_dir: Path
    step: int = 0
    best: dict = field(default_factory=lambda: {"f1": -1.0, "step": 0, "metrics": {}})
    best_state: dict = field(default_factory=dict)
    stale: int = 0  # validations without a better selection score
    t0: float = field(default_factory=time.perf_counter)
    bar: object = None  # tqdm progress bar, or None
    # cfg.ema_decay: the moving average of the weights (torch AveragedModel), or None
    ema: torch.optim.swa_utils.AveragedModel | None = None

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def judged(self) -> torch.nn.Module:
        """The weights that are validated and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          device: str | None = None, max_steps: int | None = None,
          progress: bool = True) -> ModelCard:
    """Train per `cfg`; returns the card of the best weights written to `out_dir`.

    An epoch is the run of steps up to the next validation or checkpoint (the stream of
    training tiles is endless): :func:`train_one_epoch`, then :func:`evaluate` and
    the choice of the best weights at a validation step, the checkpoint at a checkpoint
    step, early stopping; at the end the peak threshold is calibrated on the best
    weights and the model written (:func:`_finish`)."""
    run = _set_up(cfg, Path(out_dir), device=device, max_steps=max_steps, resume=resume,
                  progress=progress)
    while run.step < run.steps:
        train_one_epoch(run, until=_epoch_end(run.step, cfg, run.steps))
        if run.val_tiles and (run.step % cfg.val_every == 0 or run.step == run.steps):
            _select(run, evaluate(run.judged, run.val_tiles, card=run.card, device=run.device,
                                  radius_um=cfg.match_radius_um))
        if run.step % cfg.checkpoint_every == 0:
            _save_checkpoint(run.checkpoint, run.model, run.optimizer, run.scheduler,
                             run.step, run.best, run.ema)
        if cfg.early_stopping_patience and run.stale >= cfg.early_stopping_patience:
            log.info("early stopping at step %d (no F1 gain in %d validations)", run.step,
                     run.stale)
            break
    return _finish(run)


def _epoch_end(step: int, cfg: TrainConfig, steps: int) -> int:
    """The step after `step` that ends an epoch: the next validation or checkpoint step,
    or the last step."""
    return min(steps, *((step // every + 1) * every
                        for every in (cfg.val_every, cfg.checkpoint_every)))


def train_one_epoch(run: TrainRun, *, until: int) -> None:
    """Optimise from ``run.step`` to step `until`: one batch per step (bf16 autocast
    where native), losses (:func:`compute_losses`), gradient clipping at 5, AdamW and the
    schedule; each step's learning rate and losses are a row of ``metrics.csv``."""
    cfg, card, dev = run.cfg, run.card, run.device
    run.model.train()
    while run.step < until:
        batch = {k: v.to(dev, non_blocking=True) for k, v in next(run.batches).items()}
        images = batch["image"].permute(0, 3, 1, 2)  # NHWC uint8 → channels_last NCHW
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            logits = run.model(images)
        parts = compute_losses(logits.float(), batch, card=card, weights=cfg.loss_weights)
        run.optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 5.0)
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        run.step += 1
        _append_metrics(run.out_dir / "metrics.csv", {
            "step": run.step, "lr": run.scheduler.get_last_lr()[0],
            **{f"loss_{k}": float(v.detach()) for k, v in parts.items()},
            "elapsed_s": round(time.perf_counter() - run.t0, 1)})
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{parts['total'].item():.3f}",
                                best_f1=f"{run.best['f1']:.3f}")


def _select(run: TrainRun, val: dict) -> None:
    """Record a validation (``validation.csv``) and keep the weights if their selection
    score is the best so far (else count a stale validation)."""
    _append_metrics(run.out_dir / "validation.csv", {
        "step": run.step, **{k: v for k, v in val.items() if not isinstance(v, dict)},
        **{f"{name}.{k}": v for name, m in val["sets"].items() for k, v in m.items()
           if not isinstance(v, dict)},
        "best_f1": max(val["sweep_f1"].values(), default=0.0)})
    val_f1 = max(val["sweep_f1"].values(), default=0.0)  # at the best threshold
    score = _selection_score(val, val_f1, run.cfg.select_by)
    best = run.best
    if score > best.get("score", best["f1"]):
        run.best = {"f1": val_f1, "score": score, "step": run.step, "metrics": val}
        run.best_state = {k: v.detach().clone() for k, v in run.judged.state_dict().items()}
        run.stale = 0
    else:
        run.stale += 1
    log.info("step %d: val F1 %.3f (best threshold %s), selection score %.3f "
             "(best %.3f @ %d)", run.step, val_f1, val.get("best_threshold"), score,
             run.best.get("score", run.best["f1"]), run.best["step"])


def _set_up(cfg: TrainConfig, out_dir: Path, *, device: str | None, max_steps: int | None,
            resume: bool, progress: bool) -> TrainRun:
    """The model (from the registry; `cfg.init_from` or a low heatmap bias), the data,
    the optimiser and schedule, and with `resume` the state of the checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    dev = select_device(device or cfg.device)
    steps = int(max_steps or cfg.max_steps)
    card = cfg.model_card()
    model = create_model(card.architecture, card.out_channels, mean=card.mean, std=card.std,
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
        opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=steps))
    run = TrainRun(cfg=cfg, card=card, model=model, batches=iter(()), optimizer=opt,
                   scheduler=sched, device=dev, use_bf16=False, steps=steps,
                   val_tiles=val_tiles, data_info=data_info, out_dir=out_dir)
    if cfg.ema_decay:  # the average starts at the initial weights (as timm's ModelEmaV2)
        run.ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
            use_buffers=True)
        run.ema.update_parameters(model)
    if resume:
        if not run.checkpoint.exists():
            raise UsageError(f"--resume: no checkpoint in {out_dir}")
        state = torch.load(run.checkpoint, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if run.ema is not None:
            if "ema" not in state:
                raise UsageError(f"--resume: {run.checkpoint} has no EMA weights "
                                 "(ema_decay was off)")
            run.ema.load_state_dict(state["ema"])
        run.step, run.best = int(state["step"]), state["best"]
        if run.best.get("metrics"):  # the selection rule may differ from the first run's
            run.best["score"] = _selection_score(run.best["metrics"], run.best["f1"],
                                                 cfg.select_by)
        log.info("resumed from step %d", run.step)
    run.best_state = {k: v.detach().clone() for k, v in run.judged.state_dict().items()}
    run.use_bf16 = bf16_is_native(dev)  # CUDA, or a CPU with native bf16 (2-3x faster steps)
    run.bar = _progress(steps, run.step, progress)
    run.t0 = time.perf_counter()
    run.batches = iter(loader)
    return run


def _finish(run: TrainRun) -> ModelCard:
    """The best weights (the last without validation), the peak threshold calibrated on
    them, the card with the training record; written into the output folder."""
    if run.bar is not None:
        run.bar.close()
    model, card, cfg = run.model, run.card, run.cfg
    model.load_state_dict(run.best_state if run.val_tiles else run.judged.state_dict())
    best = run.best
    if run.val_tiles and card.cell_classes:  # the peak threshold is calibrated, not guessed
        best_thr = best["metrics"].get("best_threshold", card.heatmap.threshold)
        card = card.model_copy(update={"heatmap": card.heatmap.model_copy(
            update={"threshold": best_thr})})
        best["metrics"] = evaluate(model, run.val_tiles, card=card, device=run.device,
                                   radius_um=cfg.match_radius_um)
    card = card.model_copy(update={
        "training": {**card.training, **run.data_info, "init_from": cfg.init_from,
                     "steps": run.step, "best_step": best["step"],
                     "seconds": round(time.perf_counter() - run.t0, 1),
                     "device": str(run.device),
                     "precision": "bfloat16" if run.use_bf16 else "float32",
                     "config": cfg.model_dump(mode="json")},
        "metrics": {"validation": best["metrics"]},
    })
    return save_model(model.cpu(), card, folder=run.out_dir, storage=cfg.weights_storage)


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
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
