"""``cells.geojson`` and ``regions.geojson``: GeoJSON FeatureCollections QuPath imports.

QuPath conventions followed (QuPath's own reader/writer,
qupath-core/src/main/java/qupath/lib/io/PathObjectTypeAdapters.java, and
https://qupath.readthedocs.io "Exporting annotations"): coordinates in level-0 pixels with
the origin at the top-left of the full-resolution image; a ``FeatureCollection`` of
``Feature``s whose ``id`` is a UUID string (QuPath ≥ 0.4 keeps it as the object ID and
ignores non-UUID ids); ``properties.objectType`` ``"detection"`` or ``"annotation"``;
``properties.classification`` ``{"name": str, "color": [r, g, b]}``;
``properties.measurements`` a flat ``{name: number}`` object (numbers only, so the cell's
compartment is a separate ``compartment`` property, kept by GeoJSON readers and ignored by
QuPath); ``isLocked`` boolean.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from tilscore.io.atomic import atomic_path
from tilscore.io.cells import Field, format_fixed, format_strings, join_fields, literal
from tilscore.io.colors import color_of

log = logging.getLogger(__name__)

N_SIDES = 12  # nucleus circle drawn as a regular 12-gon
CHUNK_CELLS = 32_768


def write_cells_geojson(path: str | Path, cells: dict[str, np.ndarray],
                        radius_px: float | dict[str, float],
                        colors: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Write cells as QuPath detections: a closed 12-gon of the nucleus radius per cell.

    `cells`: 1-D arrays ``x_px``, ``y_px`` (level-0 px, centres), ``class`` (str),
    ``score`` (float) and optionally ``compartment`` (str). `radius_px`: nucleus radius in
    level-0 px, one for all or per class name (classes not listed use the largest).
    Vertices are written with 2 decimals, so a polygon's centroid is within 0.005 px of
    the centre. Ids are UUIDs derived from the coordinates: the same input gives the same
    file. A non-finite score is left out of ``measurements``.
    """
    x = np.asarray(cells["x_px"], np.float64)
    y = np.asarray(cells["y_px"], np.float64)
    cls = np.asarray(cells["class"]).astype(str)
    score = np.asarray(cells["score"], np.float64)
    comp = np.asarray(cells["compartment"]).astype(str) if "compartment" in cells else None
    n = len(x)
    if not (len(y) == len(cls) == len(score) == n) or (comp is not None and len(comp) != n):
        raise ValueError("cells columns must all have the same length")
    if isinstance(radius_px, dict):
        default = max(radius_px.values()) if radius_px else 1.0
        names, inv = np.unique(cls, return_inverse=True)
        radius = np.array([radius_px.get(c, default) for c in names], np.float64)[inv]
    else:
        radius = np.full(n, float(radius_px))
    theta = 2 * np.pi * np.arange(N_SIDES + 1) / N_SIDES  # counter-clockwise, closed
    cos, sin = np.cos(theta), np.sin(theta)
    cos[-1], sin[-1] = cos[0], sin[0]  # the ring closes on exactly its first vertex
    seed = hashlib.sha256(x.tobytes() + y.tobytes()).digest()
    rng = np.random.default_rng(np.frombuffer(seed, np.uint32))

    def classification(name: str) -> str:
        return json.dumps({"name": name, "color": list(color_of(name, colors))})

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b'{"type":"FeatureCollection","features":[\n')
        for start in range(0, n, CHUNK_CELLS):
            sl = slice(start, start + CHUNK_CELLS)
            m = len(x[sl])
            vx = x[sl, None] + radius[sl, None] * cos
            vy = y[sl, None] + radius[sl, None] * sin
            ok = np.isfinite(score[sl])
            sep = literal(",\n", m, np.arange(start, start + m) > 0)
            pieces: list[Field] = [sep, literal('{"type":"Feature","id":"', m),
                                   _uuid4_field(rng, m),
                                   literal('","geometry":{"type":"Polygon","coordinates":[[', m)]
            for k in range(N_SIDES + 1):
                pieces += [literal("[" if k == 0 else ",[", m), format_fixed(vx[:, k], 2),
                           literal(",", m), format_fixed(vy[:, k], 2), literal("]", m)]
            s_chars, s_valid = format_fixed(np.where(ok, score[sl], 0.0), 3)
            pieces += [literal(']]},"properties":{"objectType":"detection","isLocked":false,'
                               '"classification":', m),
                       format_strings(cls[sl], classification),
                       literal(',"measurements":{', m), literal('"score":', m, ok),
                       (s_chars, s_valid & ok[:, None]), literal("}", m)]
            if comp is not None:
                pieces += [literal(',"compartment":', m), format_strings(comp[sl], json.dumps)]
            pieces.append(literal("}}", m))
            fh.write(join_fields(pieces))
        fh.write(b"\n]}\n")
    log.debug("wrote %d cell detections to %s", n, path)


def _uuid4_field(rng: np.random.Generator, n: int) -> Field:
    """`n` random version-4 UUIDs as 36 ASCII characters each."""
    b = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    b[:, 6] = (b[:, 6] & 0x0F) | 0x40  # version 4
    b[:, 8] = (b[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexdigits = np.frombuffer(b"0123456789abcdef", np.uint8)
    h = np.stack([hexdigits[b >> 4], hexdigits[b & 0x0F]], axis=2).reshape(n, 32)
    dash = np.full((n, 1), ord("-"), np.uint8)
    chars = np.concatenate([h[:, :8], dash, h[:, 8:12], dash, h[:, 12:16], dash,
                            h[:, 16:20], dash, h[:, 20:]], axis=1)
    return chars, np.ones_like(chars, bool)


def write_regions_geojson(path: str | Path, labels: np.ndarray, scale_to_l0: float,
                          class_names: dict[int, str],
                          colors: dict[str, tuple[int, int, int]] | None = None, *,
                          mpp_l0: float, simplify_px: float | None = None) -> None:
    """Write one QuPath annotation (a MultiPolygon) per region class present.

    `labels`: uint8 (H, W) region codes (0 = background) on a coarse grid; label pixel
    (i, j) covers level-0 px [j·s, (j+1)·s) × [i·s, (i+1)·s) with s = `scale_to_l0`, and
    the polygons follow those pixel edges exactly (before simplification). `mpp_l0`:
    µm per level-0 px, for the ``area_um2``/``area_mm2`` measurements (pixel count × pixel
    area, exact). `simplify_px`: Douglas–Peucker tolerance in label px with topology
    preserved; off by default (None/0 = exact pixel edges) because on a detailed map it
    costs ~3× the tracing time for ~20 % fewer vertices. Codes missing from
    `class_names` are skipped.
    """
    import shapely

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W); got shape {labels.shape}")
    codes, counts = np.unique(labels, return_counts=True)
    px_area_um2 = (float(scale_to_l0) * float(mpp_l0)) ** 2
    features = []
    for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
        if code == 0:
            continue
        if code not in class_names:
            log.warning("region code %d has no class name; left out of %s", code, path)
            continue
        geom = mask_to_multipolygon(labels == code)
        if simplify_px:
            simple = shapely.simplify(geom, float(simplify_px), preserve_topology=True)
            geom = simple if simple.is_valid else geom
        geom = shapely.transform(geom, lambda c: np.round(c * float(scale_to_l0), 2))
        name = class_names[code]
        props = {"objectType": "annotation", "isLocked": False,
                 "classification": {"name": name, "color": list(color_of(name, colors))},
                 "measurements": {"area_um2": round(count * px_area_um2, 3),
                                  "area_mm2": round(count * px_area_um2 * 1e-6, 6)}}
        fid = _stable_uuid(f"{name}:{count}:{geom.bounds}")
        features.append('{"type":"Feature","id":"' + fid + '","geometry":'
                        + shapely.to_geojson(geom) + ',"properties":' + json.dumps(props) + "}")
    with atomic_path(path) as tmp:
        tmp.write_text('{"type":"FeatureCollection","features":[\n'
                       + ",\n".join(features) + "\n]}\n", encoding="utf-8")
    log.debug("wrote %d region annotations to %s", len(features), path)


def _stable_uuid(text: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, "tilscore:" + text))


# --- polygons from a label mask -------------------------------------------------------
#
# Each 4-connected component is traced on its own (so a polygon's interior is connected,
# as OGC requires; pieces touching only at a corner become separate polygons). Its mask
# is drawn on a doubled grid with one extra row/column: label pixel (i, j) becomes the
# 3×3 block of rows 2i..2i+2, cols 2j..2j+2, so label pixel edges land on even indices
# and OpenCV's contours, which pass through pixel centres of this grid, run exactly along
# label pixel edges (coordinates / 2). OpenCV cuts hole corners diagonally; the missing
# corner (the one with both coordinates even) is put back. A ring that passes a corner
# twice (pixels touching only diagonally) is split there into simple loops; a loop
# turning the other way round from its ring becomes a hole.


def mask_to_multipolygon(mask: np.ndarray):
    """shapely MultiPolygon covering exactly the True pixels of bool (H, W) `mask`, in
    label-pixel units (x = column, y = row; pixel (i, j) is the square [j, j+1]×[i, i+1])."""
    import cv2
    import shapely

    n, comp, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(mask, np.uint8), connectivity=4)
    polygons = []
    for k in range(1, n):
        x0, y0, w, h = (int(v) for v in stats[k, :4])
        sub = comp[y0:y0 + h, x0:x0 + w] == k
        grid = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
        grid[1::2, 1::2] = sub
        grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
        contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        nxt, child, parent = hierarchy[0][:, 0], hierarchy[0][:, 2], hierarchy[0][:, 3]
        offset = np.array([2 * x0, 2 * y0])
        for i in np.flatnonzero(parent == -1):  # one per component
            holes, j = [], child[i]
            while j != -1:
                holes.append(_ring(contours[j]) + offset)
                j = nxt[j]
            polygons += _assemble(_ring(contours[i]) + offset, holes)
    # valid by construction (components share no edge); checked per polygon, cheaply
    valid = shapely.is_valid(np.array(polygons, dtype=object)) if polygons else []
    out = []
    for poly, ok in zip(polygons, valid, strict=True):
        if ok:
            out.append(poly)
            continue
        log.warning("region polygon invalid (%s); repairing", shapely.is_valid_reason(poly))
        for part in shapely.get_parts(shapely.make_valid(poly)):
            out += [q for q in shapely.get_parts(part) if q.geom_type == "Polygon"]
    return shapely.MultiPolygon(out)


def _ring(contour: np.ndarray) -> np.ndarray:
    """int (N, 2) vertices (x, y) on the doubled grid, corners restored, collinear dropped."""
    p = contour[:, 0, :].astype(np.int64)
    nxt = np.roll(p, -1, axis=0)
    diag = np.all(np.abs(nxt - p) == 1, axis=1)
    if diag.any():
        corner = np.where(p[:, :1] % 2 == 0, np.stack([p[:, 0], nxt[:, 1]], 1),
                          np.stack([nxt[:, 0], p[:, 1]], 1))
        idx = np.repeat(np.arange(len(p)), 1 + diag)
        inserted = np.r_[False, idx[1:] == idx[:-1]]
        p = p[idx]
        p[inserted] = corner[idx[inserted]]
    a = p - np.roll(p, 1, axis=0)
    b = np.roll(p, -1, axis=0) - p
    return p[a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0]


def _signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _loops(p: np.ndarray) -> list[np.ndarray]:
    """Split a closed walk that revisits vertices into simple closed loops."""
    keys = p[:, 0] * (1 << 32) + p[:, 1]
    if len(np.unique(keys)) == len(keys):
        return [p]
    loops, stack, where = [], [], {}
    for idx, key in enumerate(keys.tolist()):
        if key in where:
            k = where[key]
            loops.append(np.array(stack[k:]))
            for dropped in keys[np.array(stack[k + 1:], dtype=np.int64)].tolist():
                where.pop(dropped, None)
            del stack[k + 1:]
        else:
            where[key] = len(stack)
            stack.append(idx)
    loops.append(np.array(stack))
    return [p[ix] for ix in loops if len(ix) >= 3]


def _assemble(shell: np.ndarray, holes: list[np.ndarray]) -> list:
    """Polygons (label px) from one outer contour and its hole contours (doubled grid)."""
    import shapely

    shells, inner = [], []
    for ring, is_hole in [(shell, False)] + [(h, True) for h in holes]:
        loops = _loops(ring)
        areas = [_signed_area(loop) for loop in loops]
        main = np.sign(areas[int(np.argmax(np.abs(areas)))])
        for loop, area in zip(loops, areas, strict=True):
            # a loop turning the other way round from its ring's main loop swaps role
            hole = is_hole == (np.sign(area) == main)
            (inner if hole else shells).append(loop / 2.0)
    if len(shells) == 1:
        return [shapely.Polygon(shells[0], inner)]
    # several shells (pieces touching at a corner, islands in holes): each hole goes to
    # the smallest shell that covers it
    shell_polys = np.array([shapely.Polygon(s) for s in shells], dtype=object)
    order = np.argsort(shapely.area(shell_polys))
    shapely.prepare(shell_polys)
    owned: list[list[np.ndarray]] = [[] for _ in shells]
    for ring in inner:
        hole = shapely.Polygon(ring)
        for s in order:
            if shell_polys[s].covers(hole):
                owned[s].append(ring)
                break
    return [shapely.Polygon(s, h) for s, h in zip(shells, owned, strict=True)]
