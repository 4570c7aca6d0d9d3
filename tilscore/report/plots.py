"""Pure renderers for the HTML report: strip/box plots and colour bars as inline SVG, and
label / density maps as images embedded in ``data:`` URIs. Arrays and numbers in, strings
out; no file I/O, no matplotlib (Pillow only)."""

from __future__ import annotations

import base64
import io
import math
import zlib
from dataclasses import dataclass
from html import escape

import numpy as np
from PIL import Image

# Viridis at 9 stops (perceptually uniform, readable in greyscale and by colour-blind
# readers); values in between are linearly interpolated.
VIRIDIS_STOPS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], np.float32)
POINT_COLOR = "#1f4e9c"
BOX_COLOR = "#555"


def colormap_rgb(values01: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) viridis colours for float values in [0, 1] (clipped; NaN → 0)."""
    v = np.nan_to_num(np.clip(np.asarray(values01, np.float32), 0, 1)) * (len(VIRIDIS_STOPS) - 1)
    lo = np.minimum(v.astype(int), len(VIRIDIS_STOPS) - 2)
    t = (v - lo)[..., None]
    rgb = VIRIDIS_STOPS[lo] * (1 - t) + VIRIDIS_STOPS[lo + 1] * t
    return np.round(rgb).astype(np.uint8)


def density_rgba(density: np.ndarray, vmax: float, *, tissue: np.ndarray | None = None
                 ) -> np.ndarray:
    """uint8 (h, w, 4) image of a density map (float (h, w), cells per mm²) scaled 0..`vmax`;
    NaN and cells outside `tissue` (bool (h, w), optional) are transparent."""
    d = np.asarray(density, np.float32)
    rgba = np.zeros((*d.shape, 4), np.uint8)
    rgba[..., :3] = colormap_rgb(d / vmax if vmax > 0 else np.zeros_like(d))
    visible = np.isfinite(d) if tissue is None else np.isfinite(d) & tissue
    rgba[..., 3] = np.where(visible, 255, 0)
    return rgba


def labels_rgba(labels: np.ndarray, colors: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """uint8 (h, w, 4) image of integer region codes (h, w); codes missing from `colors`
    (code → RGBA 0–255) are transparent."""
    lab = np.asarray(labels)
    lut = np.zeros((max(256, int(lab.max(initial=0)) + 1), 4), np.uint8)
    for code, rgba in colors.items():
        if 0 <= int(code) < len(lut):
            lut[int(code)] = [int(c) for c in (list(rgba) + [255])[:4]]
    return lut[np.clip(lab.astype(np.int64), 0, len(lut) - 1)]


def image_data_uri(image: np.ndarray, max_long_side_px: int = 800, *, fmt: str = "PNG",
                   min_long_side_px: int = 0) -> str:
    """``data:image/...;base64,...`` of a uint8 (h, w, 3|4) image, shrunk (area average) to at
    most `max_long_side_px` on the long side, or enlarged by an integer factor (nearest, so
    grid cells stay crisp) towards `min_long_side_px`. `fmt`: "PNG" or "JPEG"."""
    img = Image.fromarray(np.ascontiguousarray(image))
    long_px = max(img.size)
    if long_px > max_long_side_px:
        scale = max_long_side_px / long_px
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BOX)
    elif 0 < long_px < min_long_side_px:
        k = max(1, min(min_long_side_px, max_long_side_px) // long_px)
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=82, optimize=True)
        mime = "image/jpeg"
    else:
        img.save(buf, "PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


@dataclass(frozen=True)
class Point:
    """One plotted value: `value` in the plot's unit, `label` for the tooltip, `href` a link
    (e.g. ``#slide-...``) or ""."""

    value: float
    label: str
    href: str = ""


def nice_ticks(hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values from 0 to at least `hi` (> 0)."""
    raw = max(hi, 1e-9) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [k * step for k in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def strip_box_svg(groups: list[tuple[str, list[Point]]], *, title: str, unit: str,
                  height_px: int = 260) -> str:
    """Inline SVG: per group a box (quartiles, median, Tukey whiskers) with the points
    jittered over it (each with a tooltip and link), labelled ``name`` and ``n = k``.
    Each group is a ``<g class="group" data-group=... data-n=...>``. Values ≥ 0."""
    left, right, top, bottom, col = 56, 16, 28, 44, 150
    width = max(left + right + col * max(1, len(groups)), left + 8 * len(title))
    values = [p.value for _, pts in groups for p in pts]
    ticks = nice_ticks(max(values, default=0.0) or 1.0)
    y_max = ticks[-1]
    plot_h = height_px - top - bottom

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    out = [f'<svg class="dist" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height_px}" viewBox="0 0 {width} {height_px}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="{left}" y="16" class="ttl">{escape(title)}</text>']
    for t in ticks:
        out.append(f'<line x1="{left - 4}" x2="{width - right}" y1="{y(t):.1f}" '
                   f'y2="{y(t):.1f}" class="grid"/><text x="{left - 7}" y="{y(t) + 4:.1f}" '
                   f'class="tick">{_fmt(t)}</text>')
    out.append(f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" '
               f'class="unit">{escape(unit)}</text>')
    for k, (name, pts) in enumerate(groups):
        cx = left + col * (k + 0.5)
        out.append(f'<g class="group" data-group="{escape(name)}" data-n="{len(pts)}">')
        out.extend(_box(np.array([p.value for p in pts], float), cx, y))
        for p in pts:
            jitter = ((zlib.crc32(p.label.encode()) % 1000) / 1000 - 0.5) * col * 0.45
            dot = (f'<circle cx="{cx + jitter:.1f}" cy="{y(p.value):.1f}" r="4" '
                   f'fill="{POINT_COLOR}" fill-opacity="0.7"><title>{escape(p.label)}: '
                   f'{_fmt(p.value)}</title></circle>')
            out.append(f'<a href="{escape(p.href)}">{dot}</a>' if p.href else dot)
        out.append(f'<text x="{cx:.1f}" y="{height_px - 24}" class="glabel">'
                   f'{escape(name)}</text><text x="{cx:.1f}" y="{height_px - 8}" '
                   f'class="gn">n = {len(pts)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _box(v: np.ndarray, cx: float, y) -> list[str]:
    if len(v) == 0:
        return []
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    half = 30
    parts = [f'<line x1="{cx - half}" x2="{cx + half}" y1="{y(med):.1f}" y2="{y(med):.1f}" '
             f'stroke="{BOX_COLOR}" stroke-width="2" class="median"/>']
    if len(v) >= 3:
        iqr = q3 - q1
        lo = float(v[v >= q1 - 1.5 * iqr].min())
        hi = float(v[v <= q3 + 1.5 * iqr].max())
        parts += [
            f'<rect x="{cx - half}" y="{y(q3):.1f}" width="{2 * half}" '
            f'height="{max(0.5, y(q1) - y(q3)):.1f}" fill="none" stroke="{BOX_COLOR}"/>',
            f'<line x1="{cx}" x2="{cx}" y1="{y(hi):.1f}" y2="{y(q3):.1f}" stroke="{BOX_COLOR}"/>',
            f'<line x1="{cx}" x2="{cx}" y1="{y(q1):.1f}" y2="{y(lo):.1f}" stroke="{BOX_COLOR}"/>',
        ]
    return parts


def colorbar_svg(vmax: float, label: str, *, width_px: int = 220) -> str:
    """Inline SVG colour bar for :func:`density_rgba`: 0 … `vmax` with a `label`."""
    stops = "".join(f'<stop offset="{k / (len(VIRIDIS_STOPS) - 1):.3f}" '
                    f'stop-color="rgb({r:.0f},{g:.0f},{b:.0f})"/>'
                    for k, (r, g, b) in enumerate(VIRIDIS_STOPS))
    gid = f"vir{zlib.crc32(f'{vmax}{label}'.encode()):x}"
    return (f'<svg class="cbar" xmlns="http://www.w3.org/2000/svg" width="{width_px}" '
            f'height="40" viewBox="0 0 {width_px} 40"><defs><linearGradient id="{gid}">'
            f'{stops}</linearGradient></defs><rect x="4" y="4" width="{width_px - 8}" '
            f'height="12" fill="url(#{gid})"/><text x="4" y="30" class="tick0">0</text>'
            f'<text x="{width_px - 4}" y="30" class="tick">≥ {_fmt(vmax)}</text>'
            f'<text x="{width_px / 2:.0f}" y="30" class="glabel">{escape(label)}</text></svg>')
