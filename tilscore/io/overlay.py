"""``overlay.png``: the slide thumbnail with regions tinted and highlighted cells as dots,
and below it, outside the image (so it hides no tissue), a legend strip with the title
(e.g. "sTIL 23.4 %")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tilscore.io.atomic import atomic_path
from tilscore.io.colors import CLASS_COLORS, color_of

log = logging.getLogger(__name__)

REGION_NAMES = {1: "tumour", 2: "stroma", 3: "other"}
MAX_SIDE_PX = 2048
TINT_ALPHA = 0.35


def write_overlay_png(path: str | Path, thumbnail: np.ndarray, *, thumb_mpp: float,
                      labels: np.ndarray, labels_mpp: float, cells_xy_um: np.ndarray,
                      legend: dict[str, tuple[int, int, int]], title: str,
                      class_names: dict[int, str] | None = None,
                      max_side_px: int = MAX_SIDE_PX, dot_px: int | None = None) -> None:
    """Write the overlay PNG atomically.

    `thumbnail`: uint8 (H, W, 3) RGB at `thumb_mpp` µm/px, top-left = slide origin.
    `labels`: integer (h, w) region codes at `labels_mpp` µm/px, placed by physical
    position (pixel centres sampled, nearest); codes named in `class_names` (default
    1 tumour, 2 stroma, 3 other; {} for none) are tinted with their `legend` colour.
    `cells_xy_um`: float (N, 2) x, y µm of the highlighted cells, drawn as squares
    `dot_px` wide (default: 1/300 of the long side, at least 3 px, so that they stay
    visible in a thumbnail of the overlay) with a white rim (visible on stained tissue
    too), in the colour of the first `legend` entry that is not a region (else lymphocyte
    blue). The long side of the image is capped at `max_side_px`; the legend strip below
    it lists the title and the entries of `legend` (regions only if present in `labels`).
    The image's pixels keep their place: pixel (0, 0) is the slide's top-left corner.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim == 2:
        thumb = np.repeat(thumb[:, :, None], 3, axis=2)
    if thumb.ndim != 3 or thumb.shape[2] not in (3, 4) or thumb.dtype != np.uint8 \
            or 0 in thumb.shape[:2]:
        raise ValueError(f"thumbnail must be uint8 (H, W, 3); got {thumb.dtype} {thumb.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (h, w); got shape {labels.shape}")
    cells = np.asarray(cells_xy_um, np.float64).reshape(-1, 2)
    names = REGION_NAMES if class_names is None else class_names

    h0, w0 = thumb.shape[:2]
    scale = min(1.0, max_side_px / max(h0, w0))
    h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    out_mpp = thumb_mpp * w0 / w  # µm per output px
    img = Image.fromarray(thumb[:, :, :3])
    if (h, w) != (h0, w0):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    rgb = np.asarray(img, np.float32)

    lab = _sample_labels(labels, labels_mpp, out_mpp, (h, w))
    lut = np.zeros((max(256, int(lab.max(initial=0)) + 1), 3), np.float32)
    alpha = np.zeros(len(lut), np.float32)
    for code, name in names.items():
        if 0 < int(code) < len(lut):
            lut[int(code)] = color_of(name, legend)
            alpha[int(code)] = TINT_ALPHA
    a = alpha[lab][:, :, None]
    rgb = (1 - a) * rgb + a * lut[lab]
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    cell_names = [n for n in legend if n not in set(names.values())]
    cell_rgb = color_of(cell_names[0], legend) if cell_names else CLASS_COLORS["lymphocyte"]
    dot = dot_px or max(3, round(max(h, w) / 300))
    _draw_dots(out, cells / out_mpp, (255, 255, 255), dot + 2 * max(1, round(dot / 3)))  # rim
    _draw_dots(out, cells / out_mpp, cell_rgb, dot)

    present = {names[c] for c in np.unique(lab).tolist() if c in names}
    shown = {n: rgb for n, rgb in legend.items()
             if n in cell_names or n in present}  # no entry for a region not on the map
    img = _with_legend(Image.fromarray(out), shown, title)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    log.debug("wrote overlay %s (%d×%d px, %d cells)", path, w, h, len(cells))


def _sample_labels(labels: np.ndarray, labels_mpp: float, out_mpp: float,
                   shape: tuple[int, int]) -> np.ndarray:
    """Labels at the output pixel centres (nearest); 0 outside the label map."""
    h, w = shape
    rows = np.floor((np.arange(h) + 0.5) * out_mpp / labels_mpp).astype(np.int64)
    cols = np.floor((np.arange(w) + 0.5) * out_mpp / labels_mpp).astype(np.int64)
    r_ok = rows < labels.shape[0]
    c_ok = cols < labels.shape[1]
    sampled = np.zeros((h, w), np.int64)
    sampled[np.ix_(r_ok, c_ok)] = labels[np.ix_(rows[r_ok], cols[c_ok])]
    return np.clip(sampled, 0, None)


def _draw_dots(out: np.ndarray, xy_px: np.ndarray, rgb, size: int) -> None:
    """Paint `size`×`size` squares centred on (x, y) output px, in place, vectorised."""
    if len(xy_px) == 0:
        return
    ok = np.all(np.isfinite(xy_px), axis=1)
    c = np.floor(xy_px[ok, 0]).astype(np.int64)
    r = np.floor(xy_px[ok, 1]).astype(np.int64)
    offsets = np.arange(size) - (size - 1) // 2
    rr = (r[:, None, None] + offsets[None, :, None]).repeat(size, axis=2).ravel()
    cc = (c[:, None, None] + offsets[None, None, :]).repeat(size, axis=1).ravel()
    inside = (rr >= 0) & (rr < out.shape[0]) & (cc >= 0) & (cc < out.shape[1])
    out[rr[inside], cc[inside]] = rgb


def _with_legend(img, legend: dict[str, tuple[int, int, int]], title: str):
    """`img` with a white strip below it: the title, then one swatch + name per entry,
    flowing left to right and wrapping to the image's width."""
    w, h = img.size
    size = max(10, min(w, 2400) // 50)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(img)
    pad, line = size // 2, int(size * 1.4)
    entries, x, y = [], pad, pad + line  # (x, y, name); the title takes the first line
    for name in legend:
        width = size + pad + measure.textlength(name, font=font) + 2 * pad
        if x > pad and x + width > w:
            x, y = pad, y + line
        entries.append((x, y, name))
        x += width
    strip = y + line + pad if legend else line + 2 * pad
    out = Image.new("RGB", (w, h + strip), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.line([(0, h), (w, h)], fill=(160, 160, 160))
    draw.text((pad, h + pad), title, fill=(0, 0, 0), font=font)
    for x, y, name in entries:
        draw.rectangle([x, h + y + 2, x + size, h + y + 2 + size],
                       fill=color_of(name, legend), outline=(0, 0, 0))
        draw.text((x + size + pad, h + y), name, fill=(0, 0, 0), font=font)
    return out
