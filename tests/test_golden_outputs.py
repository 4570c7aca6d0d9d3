"""Golden outputs: byte-identity regression test of everything `tilscore score` writes.

Three small synthetic slides (H&E, FOXP3, CD20; 2048 px at 0.25 µm/px, fixed seeds) are
scored with the shipped models (models/he-default, models/ihc-default) on the CPU by the
command line, in one run over a manifest, and every output is compared with digests
stored in ``tests/golden/outputs.json``. Unlike the accuracy tests in test_pipeline.py
(outputs against the synthetic truth, with tolerances), this test says only "nothing
changed": a refactor must leave it green without touching the reference.

Compared, per slide:

- ``summary.json``: sha256 of its JSON without :data:`EXCLUDED`, keys in the file's order
  (the file is written in that order), and a few readable numbers (areas, counts, scores)
  so a failure shows what moved;
- ``cells.csv``, ``cells.geojson``, ``regions.geojson``: sha256 of the file bytes (the
  GeoJSON feature ids are seeded from the cells' coordinates, so they are stable);
- ``maps.zarr``: every group's and array's attributes (canonical JSON) and every array's
  shape, dtype and sha256 of its decoded values (not of the compressed chunks, which
  depend on the codec library's version);
- ``overlay.png``: sha256 of the decoded pixels;

and ``scores.csv`` (the run's table) as rows without the excluded columns.

Determinism: ``TILSCORE_FLOAT32=1`` (float32 inference even where the CPU has native
bf16, so the reference does not depend on AMX/AVX512-BF16) and one core (the child's CPU
affinity is set to one core, so torch runs one intra-op thread; ``OMP_NUM_THREADS=1``).
Float32 convolution kernels can still differ between CPU instruction sets, so a
reference made on one kind of machine may not hold on another: regenerate it there
(``pytest tests/test_golden_outputs.py --update-golden``) on the commit *before* a
change, never to make a change pass. A new tilscore version changes ``config_hash``
(it includes the version): regenerate then too, and say so in the commit.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tilscore.models.registry import MODELS_DIR

REFERENCE = Path(__file__).parent / "golden" / "outputs.json"
SLIDES = {"golden_he": ("he", 21), "golden_foxp3": ("foxp3", 22), "golden_cd20": ("cd20", 23)}
SIZE_PX = 2048  # 0.5 x 0.5 mm at 0.25 µm/px: 9 model tiles per slide
# summary.json keys (and scores.csv columns, with their sub-keys) that legitimately change
# from run to run: wall-clock times, the temporary input path, the command line (holds
# both), and the installed package's version string (config_hash, which includes it, is
# compared: see the module docstring).
EXCLUDED = ("timings_s", "runtime_s", "path", "command", "tilscore_version")
READABLE = ("areas_mm2", "counts", "stromal_til_percent", "til_score_tiger",
            "percent_positive", "h_score", "config_hash", "precision")

pytestmark = pytest.mark.skipif(
    not all((MODELS_DIR / m / "card.json").exists() for m in ("he-default", "ihc-default")),
    reason="shipped models he-default / ihc-default missing")


def _one_core() -> None:
    """In the child: run on a single core (torch then uses one intra-op thread)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory) -> Path:
    from tilscore.synth.writer import write_synthetic_slide

    root = tmp_path_factory.mktemp("golden-outputs")
    rows = []
    for slide_id, (stain, seed) in SLIDES.items():
        res = write_synthetic_slide(root / f"{slide_id}.tiff", stain=stain, seed=seed,
                                    size_px=(SIZE_PX, SIZE_PX), mpp=0.25)
        rows.append({"path": str(res.slide_path), "slide_id": slide_id, "stain": stain})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "slide_id", "stain"])
        writer.writeheader()
        writer.writerows(rows)
    env = {**os.environ, "TILSCORE_FLOAT32": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "tilscore.cli", "score", str(manifest), "--out",
         str(root / "out"), "--device", "cpu", "--quiet", "--no-report"],
        capture_output=True, text=True, timeout=600, env=env, preexec_fn=_one_core)
    assert proc.returncode == 0, proc.stderr
    return root / "out"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj, sort_keys: bool = True) -> bytes:
    return json.dumps(obj, sort_keys=sort_keys, ensure_ascii=True,
                      separators=(",", ":")).encode()


def _zarr_digest(path: Path) -> dict:
    """{node path: {"attrs": sha256} or {"shape", "dtype", "sha256"}} of a zarr store."""
    import zarr

    out = {}

    def walk(group, prefix: str) -> None:
        out[prefix or "/"] = {"attrs": _sha256(_canonical(dict(group.attrs)))}
        for name, arr in sorted(group.arrays()):
            values = np.ascontiguousarray(arr[...])
            out[f"{prefix}/{name}"] = {"shape": list(values.shape), "dtype": str(values.dtype),
                                       "attrs": _sha256(_canonical(dict(arr.attrs))),
                                       "sha256": _sha256(values.tobytes())}
        for name, sub in sorted(group.groups()):
            walk(sub, f"{prefix}/{name}")

    walk(zarr.open_group(str(path), mode="r"), "")
    return out


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in EXCLUDED}


def _slide_digest(folder: Path) -> dict:
    from PIL import Image

    summary = json.loads((folder / "summary.json").read_text())
    with Image.open(folder / "overlay.png") as im:
        overlay = np.asarray(im.convert("RGB"))
    return {
        "readable": {k: summary.get(k) for k in READABLE},
        "summary.json": _sha256(_canonical(_strip(summary), sort_keys=False)),
        "cells.csv": _sha256((folder / "cells.csv").read_bytes()),
        **{name: _sha256((folder / name).read_bytes())
           for name in ("cells.geojson", "regions.geojson")},
        "maps.zarr": _zarr_digest(folder / "maps.zarr"),
        "overlay.png": {"shape": list(overlay.shape), "sha256": _sha256(overlay.tobytes())},
    }


def _scores_digest(path: Path) -> str:
    with open(path, newline="") as fh:
        rows = [{k: v for k, v in row.items() if k.split(".")[0] not in EXCLUDED}
                for row in csv.DictReader(fh)]
    return _sha256(_canonical(rows, sort_keys=False))  # column order is the file's


def _digest(out: Path) -> dict:
    return {"slides": {slide_id: _slide_digest(out / slide_id) for slide_id in SLIDES},
            "scores.csv": _scores_digest(out / "scores.csv")}


@pytest.fixture(scope="module")
def digests(golden_run, request) -> tuple[dict, dict]:
    got = _digest(golden_run)
    if request.config.getoption("--update-golden"):
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if not REFERENCE.exists():
        pytest.fail(f"no reference {REFERENCE}: run with --update-golden to make it")
    return got, json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("slide_id", list(SLIDES))
@pytest.mark.parametrize("output", ["summary.json", "cells.csv", "cells.geojson",
                                    "regions.geojson", "maps.zarr", "overlay.png"])
def test_golden_output_unchanged(digests, slide_id, output):
    got, want = digests
    g, w = got["slides"][slide_id], want["slides"][slide_id]
    assert g[output] == w[output], (
        f"{slide_id}/{output} changed; readable numbers now {g['readable']}, "
        f"reference {w['readable']}")


def test_golden_scores_table_unchanged(digests):
    got, want = digests
    assert got["scores.csv"] == want["scores.csv"]

