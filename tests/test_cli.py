"""Command-line contract: one-line errors, no tracebacks, exit codes 0/1/2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from tests.conftest import shared_path

CLI = [sys.executable, "-m", "tilscore.cli"]


def run(*args, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, code):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tilscore: error:")
    assert "Traceback" not in proc.stderr


@pytest.mark.real_data
def test_info_json_on_real_slides():
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    proc = run("info", svs, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["dimensions"] == [2220, 2967] and info["vendor"] == "aperio"
    assert info["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert len(info["levels"]) == 1 and info["objective_power"] == 20
    assert "thumbnail" in info["associated_images"]
    boxes = json.loads(run("info", shared_path("slides", "boxes.tiff"), "--json").stdout)
    assert len(boxes["levels"]) == 4


def test_info_plain_image_has_null_mpp(tmp_path):
    from PIL import Image

    path = tmp_path / "roi.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    proc = run("info", path, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["mpp"] is None


@pytest.mark.parametrize("name,content", [
    ("missing.svs", None), ("empty.svs", b""), ("notes.txt", b"hello, not a slide\n"),
])
def test_bad_files_fail_with_one_line(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(run("info", path), 1)


def test_truncated_tiff(tmp_path):
    path = tmp_path / "cut.tiff"
    data = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, data, tile=(128, 128), compression="zlib")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    assert_one_line_error(run("info", path), 1)


def test_not_brightfield(tmp_path):
    path = tmp_path / "fluo.tiff"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint16))
    proc = run("info", path)
    assert_one_line_error(proc, 1)
    assert "brightfield" in proc.stderr.lower() or "16-bit" in proc.stderr


@pytest.mark.real_data
def test_broken_svs():
    assert_one_line_error(run("info", shared_path("slides", "broken.svs")), 1)


def test_usage_errors_exit_2(tmp_path):
    assert run("nosuchcommand").returncode == 2
    assert run("info").returncode == 2
    proc = run("synth", tmp_path / "x.tiff", "--stain", "pas")
    assert_one_line_error(proc, 2)
    assert "he, cd20, foxp3" in proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = run("--debug", "info", tmp_path / "missing.svs")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_synth_cli_writes_slide_and_truth(tmp_path):
    out = tmp_path / "s.tiff"
    proc = run("synth", out, "--size", "1024", "768", "--seed", "2", "--stain", "foxp3")
    assert proc.returncode == 0, proc.stderr
    truth = json.loads(out.with_suffix(".truth.json").read_text())
    assert truth["stain"] == "foxp3" and truth["size_px"] == [1024, 768]
    info = json.loads(run("info", out, "--json").stdout)
    assert info["dimensions"] == [1024, 768] and info["mpp"] == pytest.approx(0.25)


@pytest.mark.parametrize("content, message", [
    (b"score:\n  density_grid_um: 1.0e-6\n",
     "density_grid_um must be a number from 10 to 10000 µm, got 1e-06"),
    (b"score:\n  near_tumour_um: .inf\n", "near_tumour_um must be a number from 0 to 2000"),
    ("score:\n  coarse_mpp: 8 # \u00b5m\n".encode("latin-1"), "not UTF-8 text"),
    (b"score: [", "invalid YAML"),
])
def test_bad_score_config_exits_2_before_any_slide(tmp_path, capsys, content, message):
    """Checked before anything runs: exit 2, one line naming the key and its range (a
    1e-6 µm grid failed every slide after its model pass; a Latin-1 config exited 1)."""
    from tilscore.cli import main

    config = tmp_path / "score.yaml"
    config.write_bytes(content)
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "any.svs"), "--out", str(out), "--config",
                 str(config), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tilscore: error: {config}: ") and message in err, err
    assert err.count("\n") == 1 and not out.exists()


def test_absurd_batch_size_is_refused_before_any_slide(tmp_path):
    proc = run("score", tmp_path / "any.svs", "--out", tmp_path / "out", "--batch-size",
               "100000000")
    assert proc.returncode == 2 and "batch-size" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_end_of_run_line_shows_the_stain_s_scores():
    from tilscore.cli import _headline

    he = {"stain": "he", "stromal_til_percent": 23.4, "areas_mm2.tissue": 0.943,
          "qc.tiles": 25, "runtime_s": 20.1, "percent_positive": None}
    assert _headline(he) == ("stromal_til_percent=23.4, areas_mm2.tissue=0.943, qc.tiles=25, "
                             "runtime_s=20.1")
    ihc = {"stain": "cd20", "stromal_til_percent": None, "percent_positive": 12.5,
           "densities_per_mm2.cd20_positive.tissue": 256.1,
           "densities_per_mm2.cd20_positive.tumour": None,  # --model none: not measured
           "densities_per_mm2.cd20_positive.stroma": None, "h_score": 31.0,
           "areas_mm2.tissue": 0.9, "qc.tiles": 16, "runtime_s": 9.0}
    line = _headline(ihc)
    assert line.startswith("percent_positive=12.5, densities_per_mm2.cd20_positive.tissue=256,")
    assert "h_score=31" in line and "tumour" not in line and "stromal" not in line


def test_help_shows_the_computed_defaults():
    """Defaults that depend on the device or the mode are shown as text (written in the
    help as "[default: …]" they were taken for rich markup and vanished)."""
    score = run("score", "--help").stdout
    for text in ("(he-regions)", "(2 on CPU, the cores minus 2 on CUDA)", "(8 on CPU, 32 on CUDA)"):
        assert text in " ".join(score.replace("│", " ").split()), text
    demo = run("demo", "--help").stdout
    assert "(4096; 1024 with --cohort)" in " ".join(demo.replace("│", " ").split())
