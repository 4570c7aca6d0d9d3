"""``maps.zarr``: the density map and the region label map as OME-Zarr (NGFF 0.5).

NGFF 0.5 is Zarr v3 (what zarr-python 3 writes by default) with the OME metadata under
the ``ome`` key of each group's ``attributes`` (https://ngff.openmicroscopy.org/0.5/).
Laid out as the spec's image with labels, so OME-Zarr readers (the ``ome-zarr`` Reader,
which napari's plugin uses) find both, and ``ome-zarr-models`` validates it::

    maps.zarr/                 image: ome.multiscales (name: til_density, or
      0, 1, ... n-1              <marker>_positive_density); float32 (y, x) cells per mm²
                                 of tissue, NaN where a grid cell holds no tissue; level k
                                 is the 2×2 mean of the finite values of level k-1
      labels/                  ome.labels: ["regions"]
        regions/               label image: ome.multiscales + ome.image-label (colours and
          0, 1, ... n-1          properties of codes 0-3, source ../../); uint8 (y, x)
                                 region codes, level k the 2×2 mode of level k-1

The root also holds ``tilscore`` attributes: the density's name, unit, grid and
denominator, and the region codes. The label image has as many levels as the image (the
spec's rule) but not its pixel grid: regions are mapped at the region map's few µm/px,
the density on a ``density_grid_um`` grid (50× coarser by default), and repeating each
density value 2,500 times would carry no information. Both sit in one physical
coordinate system, which is how readers overlay them.

Coordinates: axes ``y``, ``x`` in micrometres from the slide's top-left corner. Level k of
a map at m µm/px has scale m·2^k and translation m·2^k / 2: pixel i of level k covers
[i·m·2^k, (i+1)·m·2^k) µm and its centre, the NGFF/napari sample point, sits at
(i + ½)·m·2^k, so all levels and both maps line up exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from tilscore.io.atomic import host_tag, pid_alive
from tilscore.io.colors import color_of

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
BAND_ROWS = 2048  # rows read at a time (even, so 2×2 blocks never straddle two bands)
MIN_SIDE_PX = 256  # stop downsampling the labels once the smaller side is below this
CHUNK_PX = 512
LABELS_NAME = "regions"  # maps.zarr/labels/regions
DENSITY_DENOMINATOR = ("the tissue area of each grid cell (region codes > 0 in the region "
                       "map); NaN where a grid cell holds no tissue")


def write_ome_zarr(path: str | Path, labels_source, *, mpp_labels: float,
                   density_map: np.ndarray, density_mpp: float,
                   class_names: dict[int, str],
                   colors: dict[str, tuple[int, int, int]] | None = None,
                   band_rows: int = BAND_ROWS, density_name: str = "til_density",
                   density_unit: str = "lymphocytes per mm²") -> None:
    """Write ``maps.zarr`` atomically (temporary folder, then rename; replaces `path`).

    `labels_source`: 2-D integer (H, W) region codes at `mpp_labels` µm/px, 0 = background:
    a zarr array (e.g. ``RegionCanvas.labels``) or numpy array, read `band_rows` rows at
    a time so memory stays bounded; written to ``labels/regions``. `density_map`: float32
    (h, w) cells per mm² of tissue on a `density_mpp` µm/px grid (NaN where no tissue);
    the root image, named `density_name` (``til_density`` on H&E,
    ``<marker>_positive_density`` on IHC) and described by `density_unit`.
    `class_names`: code → name of the tissue classes (0 is "background"); `colors`:
    name → RGB (default: the shared table).
    """
    shape = tuple(getattr(labels_source, "shape", ()))
    dtype = np.dtype(getattr(labels_source, "dtype", np.float64))
    if len(shape) != 2 or dtype.kind not in "iu" or dtype.itemsize > 4:
        raise ValueError(f"labels must be a 2-D integer array; got shape {shape}, {dtype}")
    if band_rows < 2 or band_rows % 2:
        raise ValueError(f"band_rows must be even and ≥ 2; got {band_rows}")
    if density_map is None or density_mpp is None or not density_mpp > 0:
        raise ValueError("a density map and its grid (µm/px) are needed: the root image")
    dmap = np.asarray(density_map, np.float32)
    if dmap.ndim != 2:
        raise ValueError(f"density map must be 2-D; got shape {dmap.shape}")

    with atomic_dir(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group = root.create_group("labels").create_group(LABELS_NAME)
        n_levels = _write_pyramid(group, labels_source, np.dtype(dtype), _mode2x2, band_rows)
        names = {0: "background", **{int(c): n for c, n in class_names.items() if int(c)}}
        group.attrs["ome"] = {
            "version": NGFF_VERSION,
            "multiscales": [_multiscale(LABELS_NAME, n_levels, mpp_labels, "mode",
                                        "2x2 mode (ties: top-left pixel)")],
            "image-label": {
                "version": NGFF_VERSION,
                "colors": [{"label-value": code, "rgba": [0, 0, 0, 0] if code == 0
                            else [*color_of(name, colors), 255]}
                           for code, name in sorted(names.items())],
                "properties": [{"label-value": code, "class": name}
                               for code, name in sorted(names.items())],
                "source": {"image": "../../"},
            },
        }
        root["labels"].attrs["ome"] = {"version": NGFF_VERSION, "labels": [LABELS_NAME]}
        _write_pyramid(root, dmap, np.dtype(np.float32), _mean2x2, band_rows, n_levels)
        root.attrs.update({
            "ome": {"version": NGFF_VERSION, "multiscales": [_multiscale(
                density_name, n_levels, density_mpp, "mean",
                f"2x2 mean of finite values; {density_unit}")]},
            "tilscore": {"density": {"name": density_name, "unit": density_unit,
                                     "grid_um": float(density_mpp),
                                     "denominator": DENSITY_DENOMINATOR},
                         "labels": {LABELS_NAME: {str(c): n for c, n in sorted(names.items())}}},
        })
    log.debug("wrote %s (%s, labels/%s; %d levels)", path, density_name, LABELS_NAME,
              n_levels)


def _multiscale(name: str, n_levels: int, mpp: float, kind: str, method: str) -> dict:
    mpp = float(mpp)
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [mpp * 2**k, mpp * 2**k]},
        {"type": "translation", "translation": [mpp * 2**k / 2, mpp * 2**k / 2]}]}
        for k in range(n_levels)]
    return {"name": name, "type": kind, "metadata": {"method": method},
            "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": datasets}


def _write_pyramid(group, source, dtype: np.dtype, reduce2x2, band_rows: int,
                   n_levels: int | None = None) -> int:
    """Level 0 copied from `source`, level k+1 reduced from level k, `band_rows` at a time.
    Returns the number of levels: `n_levels`, else until the last one's smaller side is
    < MIN_SIDE_PX."""
    fill = np.nan if dtype.kind == "f" else 0
    h, w = source.shape
    prev, k = source, 0
    while True:
        chunks = (min(CHUNK_PX, h), min(CHUNK_PX, w))
        arr = group.create_array(str(k), shape=(h, w), chunks=chunks, dtype=dtype,
                                 fill_value=fill, dimension_names=["y", "x"])
        step = band_rows if k == 0 else band_rows // 2
        for r in range(0, h, step):
            if k == 0:
                band = np.asarray(prev[r:r + step])
                if band.shape != (min(step, h - r), w):
                    raise ValueError(f"source band rows {r}: shape {band.shape}")
            else:
                band = reduce2x2(np.asarray(prev[2 * r:2 * (r + step)]))
            arr[r:r + len(band)] = band.astype(dtype, copy=False)
        done = k + 1 == n_levels if n_levels else min(h, w) < MIN_SIDE_PX
        if done:
            return k + 1
        prev, h, w, k = arr, (h + 1) // 2, (w + 1) // 2, k + 1


def _blocks(a: np.ndarray, pad_value) -> tuple[np.ndarray, ...]:
    """The four pixels of each 2×2 block (top-left, top-right, bottom-left, bottom-right);
    odd sizes are padded with `pad_value` (None: repeat the edge)."""
    ph, pw = a.shape[0] % 2, a.shape[1] % 2
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw)), mode="edge") if pad_value is None else \
            np.pad(a, ((0, ph), (0, pw)), constant_values=pad_value)
    return a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2]


def _mode2x2(a: np.ndarray) -> np.ndarray:
    """Most frequent value of each 2×2 block; ties go to the earliest of TL, TR, BL, BR."""
    b = _blocks(a, None)
    best, best_n = b[0], sum((b[0] == o).astype(np.uint8) for o in b[1:])
    for i in (1, 2, 3):
        n = sum((b[i] == b[j]).astype(np.uint8) for j in range(4) if j != i)
        take = n > best_n
        best, best_n = np.where(take, b[i], best), np.maximum(n, best_n)
    return best


def _mean2x2(a: np.ndarray) -> np.ndarray:
    """Mean of the finite values of each 2×2 block (NaN where none is finite)."""
    b = _blocks(a.astype(np.float64), np.nan)
    ok = [np.isfinite(x) for x in b]
    total = sum(np.where(m, x, 0.0) for x, m in zip(b, ok, strict=True))
    count = sum(m.astype(np.int8) for m in ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (a file or
    folder there is removed only after the rename), on failure it is deleted.

    The folder is ``.<name>.tmp-<host>-<pid>``; leftovers of dead processes on this host
    (a SIGKILL mid-write) are removed at the next write. Between the two renames `path`
    is briefly absent, never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = host_tag()
    _remove_stale(path, host)
    tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{host}-{os.getpid()}")
        if path.exists() or path.is_symlink():
            _remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _remove_stale(path: Path, host: str) -> None:
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f".{path.name}.{kind}-{host}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                log.debug("removing stale %s", p)
                _remove(p)
