"""Training data: labelled tiles from synthetic scenes and labelled folders, resampled to
the model's mpp, augmented (albumentations: image, masks and keypoints together) and
turned into loss targets.

A training sample is a dict of tensors:
``image`` uint8 (H, W, 3); ``region`` int64 (H, W) (IGNORE = no loss); ``heat`` float32
(C, H, W) cell-centre heatmaps; ``heat_weight`` float32 (1, H, W) (0 around unclassified
nuclei and where a source labels no cells); ``nucleus`` float32 (H, W) lymphocyte-nucleus
mask; ``nucleus_weight`` float32 (H, W).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from tilscore.errors import UsageError
from tilscore.synth.scene import SyntheticScene
from tilscore.training.importers.detect import load_folder
from tilscore.training.importers.labelled import (
    CELL_CODES,
    IGNORE,
    UNCLASSIFIED,
    LabelledTile,
    card_cell_index,
)
from tilscore.training.targets import disc_mask, gaussian_heatmaps, weak_nucleus_mask

log = logging.getLogger(__name__)

SYNTH_SCENE_PX = 3072  # side of each synthetic training scene (level 0, 0.25 µm/px)
SYNTH_SCENE_MPP = 0.25


# --- resampling and augmentation -------------------------------------------------------

def resample_tile(tile: LabelledTile, mpp: float) -> LabelledTile:
    """The tile at `mpp` µm/px: image area/linear, labels nearest, points scaled."""
    scale = tile.mpp / mpp
    if abs(scale - 1.0) < 1e-3:
        return tile
    h, w = tile.image.shape[:2]
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    near = cv2.INTER_NEAREST

    def lab(a):
        return None if a is None else cv2.resize(a, (nw, nh), interpolation=near)

    return replace(tile, image=cv2.resize(tile.image, (nw, nh), interpolation=interp),
                   region=lab(tile.region), nucleus_mask=lab(tile.nucleus_mask),
                   points_xy=tile.points_xy * np.array([nw / w, nh / h]), mpp=mpp)


def pad_to_multiple(tile: LabelledTile, multiple: int = 32) -> LabelledTile:
    """Pad right/bottom with white (region IGNORE) so the sides divide `multiple`."""
    h, w = tile.image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return tile

    def pad(a, value):
        if a is None:
            return None
        widths = ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2)
        return np.pad(a, widths, constant_values=value)

    return replace(tile, image=pad(tile.image, 255), region=pad(tile.region, IGNORE),
                   nucleus_mask=pad(tile.nucleus_mask, 0))


def build_augment(crop_px: int, stain: str = "he", *, seed: int | None = None):
    """albumentations pipeline: crop, flips/rot90, scale, stain, colour, blur, JPEG.

    `seed` seeds albumentations' own generator (it does not draw from numpy's or
    torch's), so a training run repeats with its config's seed."""
    # lazy: albumentations (~3 s), only to augment (`tilscore eval` imports this module)
    import albumentations as A

    # Stain augmentation strong enough for other labs and scanners (issue: the heatmap
    # scale moved between CRCHistoPhenotypes and CoNSeP): a random H&E stain matrix on
    # most samples.
    colour = [A.HEStain(p=0.7)] if stain == "he" else []
    return A.Compose(
        [
            A.PadIfNeeded(crop_px, crop_px, border_mode=cv2.BORDER_CONSTANT, fill=255,
                          fill_mask=IGNORE),
            A.RandomCrop(crop_px, crop_px),
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.Affine(scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=0.3),
            *colour,
            A.HueSaturationValue(8, 12, 8, p=0.5),
            A.RandomBrightnessContrast(0.12, 0.12, p=0.5),
            A.RandomGamma((85, 115), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), p=0.15),
            A.ImageCompression(quality_range=(60, 95), p=0.3),
        ],
        keypoint_params=A.KeypointParams(format="xy", label_fields=["cls"],
                                         remove_invisible=True),
        seed=seed,
    )


def center_crop(tile: LabelledTile, crop_px: int, *, rng: np.random.Generator) -> LabelledTile:
    """A random crop without augmentation (pads small tiles)."""
    h, w = tile.image.shape[:2]
    if h < crop_px or w < crop_px:
        tile = pad_to_multiple(tile, crop_px)
        h, w = tile.image.shape[:2]
    y0 = int(rng.integers(0, h - crop_px + 1))
    x0 = int(rng.integers(0, w - crop_px + 1))
    sl = (slice(y0, y0 + crop_px), slice(x0, x0 + crop_px))
    pts = tile.points_xy - (x0, y0)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < crop_px) & (pts[:, 1] >= 0) & (pts[:, 1] < crop_px)
    return replace(tile, image=tile.image[sl], points_xy=pts[inside],
                   point_cls=tile.point_cls[inside],
                   region=None if tile.region is None else tile.region[sl],
                   nucleus_mask=None if tile.nucleus_mask is None else tile.nucleus_mask[sl])


def augment_tile(tile: LabelledTile, aug) -> LabelledTile:
    """Apply `aug` to image, masks and points together (pixel-centre convention kept)."""
    masks = [tile.region if tile.region is not None else
             np.full(tile.image.shape[:2], IGNORE, np.uint8),
             tile.nucleus_mask if tile.nucleus_mask is not None else
             np.zeros(tile.image.shape[:2], np.uint8)]
    # albumentations keypoints use integer pixel centres; ours sit at .5.
    h, w = tile.image.shape[:2]
    kp_in = np.clip(tile.points_xy - 0.5, 0, [w - 1e-3, h - 1e-3])
    out = aug(image=tile.image, masks=masks, keypoints=kp_in,
              cls=tile.point_cls.tolist())
    kp = np.asarray(out["keypoints"], dtype=np.float64).reshape(-1, 2)[:, :2] + 0.5
    return replace(tile, image=out["image"],
                   region=out["masks"][0] if tile.region is not None else None,
                   nucleus_mask=out["masks"][1] if tile.nucleus_mask is not None else None,
                   points_xy=kp, point_cls=np.asarray(out["cls"], dtype=np.int64))


def make_sample(tile: LabelledTile, cell_classes: tuple[str, ...], *, sigma_um: float,
                lymph_radius_um: float) -> dict:
    """Loss targets for a tile already at the model mpp and crop size; one heatmap per
    class of `cell_classes` (the card's; labelled classes it lacks count as "other")."""
    h, w = tile.image.shape[:2]
    mpp = tile.mpp
    cls = tile.point_cls.astype(np.int64)
    heat = gaussian_heatmaps(tile.points_xy, card_cell_index(cls, cell_classes),
                             n_classes=len(cell_classes), shape=(h, w), sigma_px=sigma_um / mpp)
    heat_weight = np.full((1, h, w), 1.0 if tile.has_cells else 0.0, np.float32)
    unknown = tile.points_xy[cls == UNCLASSIFIED]
    if tile.has_cells and len(unknown):
        r = np.full(len(unknown), 1.5 * lymph_radius_um / mpp)
        heat_weight[0][disc_mask(unknown, r, shape=(h, w)) > 0] = 0.0
    lymph = tile.points_xy[cls == CELL_CODES["lymphocyte"]]
    if tile.nucleus_mask is not None:
        nucleus = tile.nucleus_mask
    else:
        nucleus = weak_nucleus_mask(tile.image, lymph, radius_px=lymph_radius_um / mpp)
    region = (tile.region if tile.region is not None
              else np.full((h, w), IGNORE, np.uint8)).astype(np.int64)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(tile.image)),
        "region": torch.from_numpy(region),
        "heat": torch.from_numpy(heat),
        "heat_weight": torch.from_numpy(heat_weight),
        "nucleus": torch.from_numpy(nucleus.astype(np.float32)),
        "nucleus_weight": torch.full((h, w), 1.0 if tile.has_cells else 0.0),
    }


# --- sources ---------------------------------------------------------------------------

class SyntheticSource:
    """Random crops of synthetic scenes with exact labels, at `mpp` µm/px."""

    def __init__(self, stain: str, mpp: float, seeds: range, scene_px: int = SYNTH_SCENE_PX):
        # scene_px: level-0 side; a coarse model (2 µm/px) needs larger scenes for context
        self.stain, self.mpp, self.seeds, self.scene_px = stain, mpp, seeds, scene_px
        self._scenes: dict[int, object] = {}

    def _scene(self, seed: int):
        if seed not in self._scenes:
            rng = np.random.default_rng(seed)
            knobs = dict(  # vary what a model must be robust to
                lymphocyte_density_stroma_per_mm2=float(rng.uniform(300, 4000)),
                lymphocyte_density_tumour_per_mm2=float(rng.uniform(50, 800)),
                lymphocyte_clustering=float(rng.uniform(0.2, 0.9)),
                tissue_fraction=float(rng.uniform(0.5, 0.8)),
            )
            self._scenes[seed] = SyntheticScene(self.scene_px, self.scene_px,
                                                mpp=SYNTH_SCENE_MPP, stain=self.stain,
                                                seed=seed, **knobs)
        return self._scenes[seed]

    def sample(self, rng: np.random.Generator, size_px: int) -> LabelledTile:
        """A `size_px` square tile at self.mpp from a random scene and place."""
        scene = self._scene(int(rng.choice(list(self.seeds))))
        ds = self.mpp / scene.mpp
        span = size_px * ds
        x0 = float(rng.uniform(0, max(1.0, scene.width_px - span)))
        y0 = float(rng.uniform(0, max(1.0, scene.height_px - span)))
        return synthetic_tile(scene, x0, y0=y0, size_px=size_px, ds=ds)


def synthetic_tile(scene, x0: float, *, y0: float, size_px: int, ds: float) -> LabelledTile:
    """Render a labelled tile of `scene` with top-left level-0 (x0, y0) at downsample `ds`.

    Each output pixel averages 2 x 2 rendered sub-pixels at half the output pixel size (at
    most the scene's own resolution): at 0.5 µm/px that is the full 0.25 µm/px scene, at
    2 µm/px it renders 1 µm/px (16x fewer pixels than rendering level 0 and averaging)."""
    supersample_um = max(scene.mpp, scene.mpp * ds / 2)
    image = scene.render(x0, y0, width=size_px, height=size_px, downsample=ds,
                         supersample_um=supersample_um)
    region = scene.region_labels(x0, y0, width=size_px, height=size_px, downsample=ds)
    cells = scene.cells(x0, y0, x1=x0 + size_px * ds, y1=y0 + size_px * ds)
    pts = np.stack([(cells["x_px"] - x0) / ds, (cells["y_px"] - y0) / ds], axis=1)
    cls = np.array([CELL_CODES[c] for c in cells["type"]], dtype=np.int64)
    lymph = cls == CELL_CODES["lymphocyte"]
    nucleus = disc_mask(pts[lymph], cells["radius_px"][lymph] / ds, shape=(size_px, size_px))
    return LabelledTile(image=image, mpp=scene.mpp * ds, region=region.astype(np.uint8),
                        points_xy=pts, point_cls=cls, nucleus_mask=nucleus,
                        source=f"synthetic:{scene.stain}:seed{scene.seed}")


class MixedTileDataset(torch.utils.data.IterableDataset):
    """Endless stream of training samples drawn from sources by weight.

    `sources`: list of (weight, sampler) where sampler(rng, size_px) -> LabelledTile at the
    model mpp (already resampled); crops are augmented when `augment`.
    """

    def __init__(self, sources, crop_px: int, cell_classes: tuple[str, ...], sigma_um: float,
                 lymph_radius_um: float, augment: bool = True, stain: str = "he",
                 seed: int = 0):
        super().__init__()
        self.sources = sources
        self.crop_px, self.cell_classes = crop_px, tuple(cell_classes)
        self.sigma_um, self.lymph_radius_um = sigma_um, lymph_radius_um
        self.augment, self.stain, self.seed = augment, stain, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, wid, torch.initial_seed() % 2**31])
        weights = np.array([w for w, _ in self.sources], dtype=np.float64)
        weights /= weights.sum()
        aug = (build_augment(self.crop_px, self.stain, seed=int(rng.integers(2**31)))
               if self.augment else None)
        # Sample a little larger than the crop so rotation/scale never pads with nothing.
        fetch_px = int(math.ceil(self.crop_px * 1.15 / 32) * 32)
        while True:
            _, sampler = self.sources[int(rng.choice(len(self.sources), p=weights))]
            tile = sampler(rng, fetch_px)
            tile = augment_tile(tile, aug) if aug is not None else center_crop(
                tile, self.crop_px, rng=rng)
            yield make_sample(tile, self.cell_classes, sigma_um=self.sigma_um,
                              lymph_radius_um=self.lymph_radius_um)


class FolderSource:
    """Random crops from labelled tiles loaded from a folder (any supported format)."""

    def __init__(self, tiles: list[LabelledTile], mpp: float):
        self.tiles = [resample_tile(t, mpp) for t in tiles]

    def sample(self, rng: np.random.Generator, size_px: int) -> LabelledTile:
        tile = self.tiles[int(rng.integers(len(self.tiles)))]
        return center_crop(tile, min(size_px, *tile.image.shape[:2]), rng=rng)


def split_tiles(tiles: list[LabelledTile], val_fraction: float, *, seed: int):
    """Use the dataset's own split when it has one, else a seeded random split."""
    if any(t.split for t in tiles):
        return ([t for t in tiles if t.split != "val"], [t for t in tiles if t.split == "val"])
    order = np.random.default_rng(seed).permutation(len(tiles))
    n_val = int(round(val_fraction * len(tiles)))
    return [tiles[i] for i in order[n_val:]], [tiles[i] for i in order[:n_val]]


def build_datasets(cfg) -> tuple[MixedTileDataset, dict[str, list[LabelledTile]], dict]:
    """Training stream, validation tiles per source (name → tiles at the model mpp,
    padded to /32; "synthetic" or the folder's name) and provenance."""
    sources, val_sets, info = [], {}, []
    for k, src in enumerate(cfg.data):
        if src.kind == "synthetic":
            train_src = SyntheticSource(src.stain, cfg.input_mpp, range(1000, 1000 + src.scenes),
                                        src.scene_px)
            val_src = SyntheticSource(src.stain, cfg.input_mpp, range(9000, 9002), src.scene_px)
            vrng = np.random.default_rng(cfg.seed + 17)
            n_val = src.val_tiles
            val_sets.setdefault("synthetic", []).extend(
                val_src.sample(vrng, 256) for _ in range(n_val))
            sources.append((src.weight, train_src.sample))
            info.append({"kind": "synthetic", "stain": src.stain, "licence": "generated in code",
                         "val_tiles": n_val})
            continue
        if not src.path:
            raise UsageError(f"data[{k}]: a {src.kind!r} source needs a path")

        tiles = load_folder(src.path, mpp=src.mpp, fmt=src.kind)
        train_tiles, val = split_tiles(tiles, src.val_fraction, seed=cfg.seed)
        if not train_tiles:
            raise UsageError(f"data[{k}]: no training tiles left in {src.path} after the split")
        sources.append((src.weight, FolderSource(train_tiles, cfg.input_mpp).sample))
        val_sets.setdefault(Path(src.path).name, []).extend(
            pad_to_multiple(resample_tile(t, cfg.input_mpp)) for t in val)
        info.append({"kind": src.kind, "path": str(src.path), "train_tiles": len(train_tiles),
                     "val_tiles": len(val)})
    ds = MixedTileDataset(sources, cfg.crop_px, cfg.cell_classes, cfg.heatmap.sigma_um,
                          cfg.lymphocyte_radius_um, augment=cfg.augment,
                          stain=cfg.stains[0], seed=cfg.seed)
    return ds, {name: v for name, v in val_sets.items() if v}, {"data": info}
