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
import uuid
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely.geometry.polygon import orient

from tilscore.io.atomic import atomic_path
from tilscore.io.cells import Field, format_fixed, format_strings, join_fields, literal
from tilscore.io.colors import color_of

log = logging.getLogger(__name__)

N_SIDES = 12  # nucleus circle drawn as a regular 12-gon
CHUNK_CELLS = 32_768
BAND_ROWS = 1024  # region map rows traced at a time (the tracer's grid is 4× a band)


def write_cells_geojson(path: str | Path, cells: dict[str, np.ndarray],
                        *, radius_px: float | dict[str, float],
                        colors: dict[str, tuple[int, int, int]] | None = None,
                        measurements: dict[str, np.ndarray] | None = None,
                        properties: dict[str, np.ndarray] | None = None) -> None:
    """Write cells as QuPath detections: a closed 12-gon of the nucleus radius per cell.

    `cells`: 1-D arrays ``x_px``, ``y_px`` (level-0 px, centres), ``class`` (str, the
    classification name), ``score`` (float) and optionally ``compartment`` (str).
    `radius_px`: nucleus radius in level-0 px, one for all or per class name (classes not
    listed use the largest). `measurements`: more ``{name: float (n,)}`` written after
    ``score`` (4 decimals; a non-finite value is left out, as a non-finite score is);
    `properties`: more ``{name: str (n,)}`` properties after ``compartment`` (kept by
    GeoJSON readers, ignored by QuPath). Vertices are written with 2 decimals, so a
    polygon's centroid is within 0.005 px of the centre. Ids are UUIDs derived from the
    coordinates: the same input gives the same file.
    """
    x = np.asarray(cells["x_px"], np.float64)
    y = np.asarray(cells["y_px"], np.float64)
    cls = np.asarray(cells["class"]).astype(str)
    score = np.asarray(cells["score"], np.float64)
    comp = np.asarray(cells["compartment"]).astype(str) if "compartment" in cells else None
    n = len(x)
    extra = {k: np.asarray(v, np.float64) for k, v in (measurements or {}).items()}
    props = {k: np.asarray(v).astype(str) for k, v in (properties or {}).items()}
    if not (len(y) == len(cls) == len(score) == n) or (comp is not None and len(comp) != n) \
            or any(len(v) != n for v in [*extra.values(), *props.values()]):
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
            sep = literal(",\n", m, rows=np.arange(start, start + m) > 0)
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
                       literal(',"measurements":{', m), literal('"score":', m, rows=ok),
                       (s_chars, s_valid & ok[:, None])]
            first = ~ok  # no score written: the next measurement needs no comma
            for name, values in extra.items():
                v = values[sl]
                fine = np.isfinite(v)
                chars, valid = format_fixed(np.where(fine, v, 0.0), 4)
                key = json.dumps(name) + ":"
                pieces += [literal("," + key, m, rows=fine & ~first), literal(key, m,
                                                                              rows=fine & first),
                           (chars, valid & fine[:, None])]
                first = first & ~fine
            pieces.append(literal("}", m))
            if comp is not None:
                pieces += [literal(',"compartment":', m), format_strings(comp[sl], json.dumps)]
            for name, values in props.items():
                pieces += [literal("," + json.dumps(name) + ":", m),
                           format_strings(values[sl], json.dumps)]
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


def write_regions_geojson(path: str | Path, labels, *, scale_to_l0: float,
                          class_names: dict[int, str],
                          colors: dict[str, tuple[int, int, int]] | None = None,
                          mpp_l0: float, image_size_l0: tuple[float, float] | None = None,
                          simplify_px: float | None = None,
                          band_rows: int = BAND_ROWS) -> None:
    """Write one QuPath annotation (a MultiPolygon) per region class present.

    `labels`: integer (H, W) region codes (0 = background), a numpy array or anything
    read by row slices (a zarr array, :class:`~tilscore.stitch.CroppedRows`), traced
    `band_rows` rows at a time so memory stays bounded; pass the region map the summary's
    areas count, so the polygons' areas are those areas. Label pixel (i, j) covers level-0
    px [j·s, (j+1)·s) × [i·s, (i+1)·s) with s = `scale_to_l0`, and the polygons follow
    those pixel edges exactly (before simplification), clipped to the image, (w, h)
    level-0 px `image_size_l0` (the region map's last row and column may reach past it).
    Exterior rings are counter-clockwise and holes clockwise (RFC 7946; the same as the
    cells' rings), in the coordinates as written (x right, y down). `mpp_l0`: µm per
    level-0 px, for the ``area_um2``/``area_mm2`` measurements (the polygons' area).
    `simplify_px`: Douglas–Peucker tolerance in label px with topology preserved; off by
    default (None/0 = exact pixel edges) because on a detailed map it costs ~3× the
    tracing time for ~20 % fewer vertices. Codes missing from `class_names` are skipped.
    """
    shape = tuple(getattr(labels, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"labels must be 2-D (H, W); got shape {shape}")
    s = float(scale_to_l0)
    limit = (np.inf, np.inf) if image_size_l0 is None else \
        (float(image_size_l0[0]) / s, float(image_size_l0[1]) / s)  # in label px
    features = []
    for code, geom in sorted(trace_regions(labels, band_rows).items()):
        if code not in class_names:
            log.warning("region code %d has no class name; left out of %s", code, path)
            continue
        geom = shapely.transform(geom, lambda c: np.minimum(c, limit))  # clip to the image
        if simplify_px:
            simple = shapely.simplify(geom, float(simplify_px), preserve_topology=True)
            geom = simple if simple.is_valid else geom
        geom = _counter_clockwise(shapely.transform(geom, lambda c: np.round(c * s, 2)))
        name = class_names[code]
        area_um2 = float(geom.area) * float(mpp_l0) ** 2
        props = {"objectType": "annotation", "isLocked": False,
                 "classification": {"name": name, "color": list(color_of(name, colors))},
                 "measurements": {"area_um2": round(area_um2, 3),
                                  "area_mm2": round(area_um2 * 1e-6, 6)}}
        fid = _stable_uuid(f"{name}:{area_um2:.3f}:{geom.bounds}")
        features.append('{"type":"Feature","id":"' + fid + '","geometry":'
                        + shapely.to_geojson(geom) + ',"properties":' + json.dumps(props) + "}")
    with atomic_path(path) as tmp:
        tmp.write_text('{"type":"FeatureCollection","features":[\n'
                       + ",\n".join(features) + "\n]}\n", encoding="utf-8")
    log.debug("wrote %d region annotations to %s", len(features), path)


def trace_regions(labels, band_rows: int = BAND_ROWS) -> dict:
    """{code: shapely MultiPolygon covering exactly its pixels} of integer (H, W)
    `labels` (read by row slices), in label-pixel units (:func:`mask_to_multipolygon`),
    for every code present but 0 (background).

    Traced in bands of `band_rows` rows; the pieces that reach a band's top or bottom
    edge are merged with their neighbours (a union along shared pixel edges), the rest are
    kept as traced."""
    h = labels.shape[0]
    done: dict[int, list] = {}
    open_: dict[int, list] = {}
    for r0 in range(0, h, band_rows):
        band = np.asarray(labels[r0:r0 + band_rows])
        r1 = r0 + len(band)
        for code in np.unique(band).tolist():
            if code == 0:
                continue
            geom = mask_to_multipolygon(band == code)
            parts = shapely.get_parts(shapely.transform(geom, lambda c, dy=r0: c + (0.0, dy)))
            if not len(parts):
                continue
            ys = shapely.bounds(parts)[:, [1, 3]]
            at_seam = ((ys[:, 0] == r0) & (r0 > 0)) | ((ys[:, 1] == r1) & (r1 < h))
            done.setdefault(code, []).extend(parts[~at_seam])
            open_.setdefault(code, []).extend(parts[at_seam])
    out = {}
    for code in sorted(set(done) | set(open_)):
        merged = (shapely.get_parts(shapely.union_all(open_[code]))
                  if open_.get(code) else [])
        polygons = [*done.get(code, []), *merged]
        out[code] = shapely.MultiPolygon([p for p in polygons if p.geom_type == "Polygon"])
    return out


def _counter_clockwise(geom):
    """The MultiPolygon with exterior rings counter-clockwise and holes clockwise (positive
    shoelace area of the coordinates as given)."""
    parts = shapely.get_parts(geom)
    if hasattr(shapely, "orient_polygons"):  # shapely ≥ 2.1: vectorised
        return shapely.MultiPolygon(list(shapely.orient_polygons(parts, exterior_cw=False)))

    return shapely.MultiPolygon([orient(p, 1.0) for p in parts])


def _stable_uuid(text: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "tilscore:" + text))


# --- polygons from a label mask -------------------------------------------------------
#
# The mask is drawn on a doubled grid with one extra row/column: label pixel (i, j)
# becomes the 3×3 block of rows 2i..2i+2, cols 2j..2j+2, so label pixel edges land on even
# indices and OpenCV's contours, which pass through pixel centres of this grid, run
# exactly along label pixel edges (coordinates / 2). OpenCV cuts concave corners
# diagonally; the missing corner (the one with both coordinates even) is put back. The
# rings (outer boundaries and holes, possibly passing a corner twice where pieces touch
# only diagonally) are noded and polygonized: every face they bound is a polygon whose
# pixels are all in the mask or all out of it, so one point inside each face tells which
# to keep. Pieces touching at a corner become separate polygons (each polygon's interior
# is 4-connected, as OGC requires). All of it runs on arrays and in GEOS, not per piece
# in Python: a whole-slide map at a few µm/px has ~10^5 pieces.


def mask_to_multipolygon(mask: np.ndarray):
    """shapely MultiPolygon covering exactly the True pixels of bool (H, W) `mask`, in
    label-pixel units (x = column, y = row; pixel (i, j) is the square [j, j+1]×[i, i+1])."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    grid = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
    grid[1::2, 1::2] = mask
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    del grid
    if not contours:
        return shapely.MultiPolygon([])
    points, ring_of = _rings(contours)
    first = np.r_[0, np.flatnonzero(np.diff(ring_of)) + 1]
    ends = np.r_[first[1:], len(points)]
    closed = np.insert(points, ends, points[first], axis=0) / 2.0  # rings end on their start
    lines = shapely.linestrings(closed, indices=np.insert(ring_of, ends, ring_of[first]))
    noded = shapely.get_parts(shapely.node(shapely.multilinestrings(lines)))
    faces = shapely.get_parts(shapely.polygonize(noded))
    xy = shapely.get_coordinates(shapely.point_on_surface(faces))
    inside = mask[np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, h - 1),
                  np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, w - 1)]
    polygons = faces[inside]
    # valid by construction; checked, cheaply, in case GEOS sees it otherwise
    valid = shapely.is_valid(polygons)
    if valid.all():
        return shapely.MultiPolygon(list(polygons))
    out = list(polygons[valid])
    for poly in polygons[~valid]:
        log.warning("region polygon invalid (%s); repairing", shapely.is_valid_reason(poly))
        for part in shapely.get_parts(shapely.make_valid(poly)):
            out += [q for q in shapely.get_parts(part) if q.geom_type == "Polygon"]
    return shapely.MultiPolygon(out)


def _rings(contours) -> tuple[np.ndarray, np.ndarray]:
    """All contours as rings on the doubled grid: int64 (N, 2) vertices (x, y), the cut
    corners restored and collinear vertices dropped, and int64 (N,) each one's contour."""
    lens = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    p = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    ring = np.repeat(np.arange(len(contours)), lens)
    nxt = _next_in_ring(ring)
    diag = np.all(np.abs(p[nxt] - p) == 1, axis=1)
    if diag.any():
        even_x = p[:, :1] % 2 == 0
        corner = np.where(even_x, np.stack([p[:, 0], p[nxt, 1]], 1),
                          np.stack([p[nxt, 0], p[:, 1]], 1))
        idx = np.repeat(np.arange(len(p)), 1 + diag)
        inserted = np.r_[False, idx[1:] == idx[:-1]]
        p, ring = p[idx], ring[idx]
        p[inserted] = corner[idx[inserted]]
    nxt = _next_in_ring(ring)
    prev = np.empty_like(nxt)
    prev[nxt] = np.arange(len(nxt))
    a, b = p - p[prev], p[nxt] - p
    keep = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0
    return p[keep], ring[keep]


def _next_in_ring(ring: np.ndarray) -> np.ndarray:
    """Index of each vertex's successor in its closed ring (`ring`: sorted ring ids)."""
    first = np.r_[0, np.flatnonzero(np.diff(ring)) + 1]
    last = np.r_[first[1:] - 1, len(ring) - 1]
    nxt = np.arange(1, len(ring) + 1)
    nxt[last] = first
    return nxt
