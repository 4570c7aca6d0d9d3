"""`tilscore report`: the self-contained HTML cohort report, on a small scored cohort.

Two tiny synthetic H&E slides are scored once per module; two more slide folders are made
from copies with edited summaries (an H&E slide and a CD20 IHC slide, which keeps the
fixture fast), metadata and QC flags are added to the summaries, and an incomplete folder,
an unreadable summary and a failures.csv row are added.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from tilscore.batch import score_inputs
from tilscore.errors import UsageError
from tilscore.models.registry import MODELS_DIR

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "he-default" / "card.json").exists(),
                                reason="shipped model models/he-default missing")
SAMPLE_TYPE = {"alpha": "primary", "beta": "metastasis", "gamma": "primary",
               "delta": "metastasis"}


def _edit(folder: Path, fn) -> dict:
    path = folder / "summary.json"
    summary = fn(json.loads(path.read_text()))
    path.write_text(json.dumps(summary))
    return summary


def _as_cd20(s: dict) -> dict:
    """An IHC (CD20) summary in the shape the IHC pipeline writes."""
    for key in ("stromal_til_percent", "stromal_til_percent_segmented", "til_score_tiger",
                "til_parts", "stromal_lymphocytes_near_tumour_fraction"):
        s.pop(key, None)
    s.update(slide="delta", stain="cd20", percent_positive=12.5,
             counts={"cd20_positive": {"tumour": 3, "stroma": 40, "other": 1, "tissue": 44},
                     "negative": {"tumour": 200, "stroma": 100, "other": 8, "tissue": 308}},
             densities_per_mm2={"cd20_positive": {"tumour": 47.75, "stroma": 430.6,
                                                  "other": 62.25, "tissue": 256.1},
                                "negative": {"tumour": 3183.7, "stroma": 1076.5,
                                             "other": 498.0, "tissue": 1793.0}})
    return s


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """OUT folder with 4 scored slides (alpha, beta scored; gamma, delta copied), an
    incomplete folder, an unreadable summary and one failure; returns (out, summaries)."""
    from tilscore.synth.writer import write_synthetic_slide

    root = tmp_path_factory.mktemp("report")
    paths = [str(write_synthetic_slide(root / f"{name}.tiff", stain="he", seed=k,
                                       size_px=(1536, 1536), mpp=0.25).slide_path)
             for k, name in ((1, "alpha"), (2, "beta"))]
    out = root / "out"
    result = score_inputs(paths, out, device="cpu", quiet=True)
    assert not result.failures, result.failures
    shutil.copytree(out / "alpha", out / "gamma")
    shutil.copytree(out / "beta", out / "delta")
    _edit(out / "gamma", lambda s: {**s, "slide": "gamma", "stromal_til_percent": 42.0,
                                    "warnings": ["no stroma inside the tumour bulk"]})
    _edit(out / "delta", _as_cd20)
    summaries = {}
    for name, sample in SAMPLE_TYPE.items():
        def add(s, name=name, sample=sample):
            s["metadata"] = {"patient_id": f"P-{name}", "sample_type": sample}
            s["qc"]["flags"] = [] if name != "beta" else [  # tiny slides flag little tissue
                {"code": "blur", "message": "18% of tissue out of focus: "
                 "sTIL% may be underestimated"}]
            return s
        summaries[name] = _edit(out / name, add)
    (out / "epsilon").mkdir()
    (out / "epsilon" / "cells.csv").write_text("x_px,y_px\n")
    (out / "zeta").mkdir()
    (out / "zeta" / "summary.json").write_text('{"slide": "zeta", ')
    (out / "failures.csv").write_text("input,error\n/data/broken.svs,broken.svs: not a slide\n")
    return out, summaries


class Page(HTMLParser):
    """Collects what the tests look at: cohort rows, hrefs, srcs, SVG groups, elements."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.hrefs, self.srcs, self.groups, self.ids = [], [], [], set()
        self.not_scored: list[str] = []
        self._row, self._table, self._col, self.heads, self._in_th = None, None, 0, [], False
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id")
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag == "g" and a.get("class") == "group":
            self.groups.append((a["data-group"], int(a["data-n"])))
        if tag == "div" and a.get("class") == "plot":
            self.groups.append(("metric", a["data-metric"]))
        if tag == "th" and self._table == "cohort":
            self._in_th, self._text = True, ""
        if tag == "tr" and self._table == "cohort" and "data-slide" in a:
            self._row, self._col = a["data-slide"], 0
            self.rows[self._row] = {}
        if tag == "tr" and self._table == "not-scored-table":
            self.not_scored.append(a.get("class", ""))
        if tag == "td" and self._row is not None:
            self.rows[self._row][self.heads[self._col]] = a.get("data-value")
            self._col += 1

    def handle_data(self, data):
        if self._in_th:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "th" and self._in_th:
            self.heads.append(self._text.strip())
            self._in_th = False
        if tag == "tr":
            self._row = None
        if tag == "table":
            self._table = None


def _page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def report(cohort):
    from tilscore.report.cohort import write_report

    out, _ = cohort
    path = write_report(out, group_by="sample_type")
    assert path == out / "report.html"
    return path, _page(path)


def test_table_has_one_row_per_scored_slide_with_summary_values(cohort, report):
    _, summaries = cohort
    _, page = report
    assert sorted(page.rows) == sorted(summaries)
    for name, s in summaries.items():
        row = page.rows[name]
        assert row["stain"] == s["stain"]
        for key in ("tissue", "tumour", "stroma"):
            assert float(row[f"{key} mm²"]) == s["areas_mm2"][key]
        assert row["sample_type"] == SAMPLE_TYPE[name]
        assert row["patient_id"] == f"P-{name}"
        if s["stain"] == "he":
            assert float(row["sTIL %"]) == s["stromal_til_percent"]
            assert float(row["TIGER %"]) == s["til_score_tiger"]
        else:
            assert float(row["% positive"]) == s["percent_positive"]
            for comp in ("tumour", "stroma", "tissue"):
                want = s["densities_per_mm2"]["cd20_positive"][comp]
                assert float(row[f"CD20+/mm² {comp}"]) == want
            assert row["sTIL %"] == ""  # no H&E score on an IHC slide
    assert page.rows["beta"]["QC"] == "1" and page.rows["alpha"]["QC"] == "0"
    # QC right after slide and stain: visible at 1,400 px whatever the other columns
    assert page.heads[:3] == ["slide", "stain", "QC"]


def test_header_counts_and_versions(cohort, report):
    path, page = report
    html = path.read_text()
    _, summaries = cohort
    assert {"n-scored", "n-failed", "n-incomplete"} <= page.ids
    assert '<span id="n-scored">4</span>' in html
    assert '<span id="n-failed">1</span>' in html
    assert '<span id="n-incomplete">2</span>' in html
    s = summaries["alpha"]
    assert s["model"]["sha256"][:12] in html and s["config_hash"] in html
    assert s["tilscore_version"] in html


def test_links_exist_and_images_are_embedded(cohort, report):
    path, page = report
    local = [h for h in page.hrefs if not h.startswith("#")]
    assert local, "no file links"
    for href in local:
        assert "://" not in href and not href.startswith("/"), href
        assert (path.parent / unquote(href)).is_file(), href
    anchors = [h[1:] for h in page.hrefs if h.startswith("#")]
    assert all(a in page.ids for a in anchors)
    assert len(page.srcs) >= 3 * 4  # overlay, regions, density per slide
    from PIL import Image

    for src in page.srcs:
        assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), src[:40]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(img.size) <= 800
    html = path.read_text()
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html


def test_group_by_splits_distributions_with_n_per_group(report):
    _, page = report
    plots: dict[str, list] = {}
    current = None
    for kind, value in page.groups:
        if kind == "metric":
            current = plots.setdefault(value, [])
        else:
            current.append((kind, value))
    assert plots["stromal_til_percent"] == [("metastasis", 1), ("primary", 2)]
    for comp in ("tumour", "stroma", "tissue"):
        assert plots[f"densities_per_mm2.cd20_positive.{comp}"] == [("metastasis", 1)]


def test_group_by_any_scores_column_and_no_grouping(cohort, tmp_path):
    from tilscore.report.cohort import write_report

    out, _ = cohort
    page = _page(write_report(out, group_by="stain", path=tmp_path / "by-stain.html"))
    groups = [g for g in page.groups if g[0] != "metric"]
    assert ("he", 3) in groups and ("cd20", 1) in groups
    page = _page(write_report(out, path=tmp_path / "sub" / "plain.html"))
    assert [g for g in page.groups if g[0] == "all"][0] == ("all", 3)
    for href in (h for h in page.hrefs if not h.startswith("#")):  # relative to its folder
        assert (tmp_path / "sub" / unquote(href)).is_file(), href


def test_incomplete_and_failed_slides_listed(report):
    path, page = report
    html = path.read_text()
    assert page.not_scored.count("failed") == 1
    assert page.not_scored.count("incomplete") == 2
    assert "broken.svs: not a slide" in html
    assert "epsilon/" in html and "no summary.json" in html
    assert "zeta/" in html and "zeta/summary.json: not valid JSON" in html
    assert "epsilon" not in page.rows and "zeta" not in page.rows


def test_qc_flags_and_warnings_shown(report):
    path, _ = report
    html = path.read_text()
    assert 'title="18% of tissue out of focus: sTIL% may be underestimated">blur<' in html
    assert "no stroma inside the tumour bulk" in html


def test_unknown_group_by_lists_columns_and_exits_2(cohort, capsys):
    from tilscore.cli import main
    from tilscore.report.cohort import write_report

    out, _ = cohort
    with pytest.raises(UsageError) as err:
        write_report(out, group_by="tumour_grade", path=out / "unused.html")
    msg = str(err.value)
    assert "tumour_grade" in msg and "sample_type" in msg and "stromal_til_percent" in msg
    assert "\n" not in msg
    assert not (out / "unused.html").exists()
    assert main(["report", str(out), "--group-by", "tumour_grade"]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("tilscore: error: unknown --group-by column 'tumour_grade'")
    assert "sample_type" in stderr and len(stderr.splitlines()) == 1


def test_cli_writes_report_and_prints_path(cohort, tmp_path, capsys):
    from tilscore.cli import main

    out, _ = cohort
    target = tmp_path / "cli.html"
    assert main(["report", str(out), "--group-by", "sample_type", "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert len(_page(target).rows) == 4


def test_folder_without_scored_slides_is_usage_error(tmp_path, capsys):
    from tilscore.cli import main
    from tilscore.report.cohort import write_report

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "overlay.png").write_bytes(b"")
    with pytest.raises(UsageError, match="no scored slides in"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "no scored slides" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "report.html").exists()


def test_damaged_maps_and_overlay_do_not_stop_the_report(cohort, tmp_path):
    from tilscore.report.cohort import write_report

    out, _ = cohort
    copy = tmp_path / "out"
    shutil.copytree(out / "alpha", copy / "alpha")
    shutil.rmtree(copy / "alpha" / "maps.zarr" / "labels" / "regions")
    (copy / "alpha" / "overlay.png").write_bytes(b"not a png")
    html = write_report(copy).read_text()
    assert "maps.zarr unreadable" in html and "overlay.png unreadable" in html


def test_rendered_maps_are_cached_until_the_slide_changes(cohort, tmp_path):
    """Re-reporting a cohort reuses each slide's rendered maps (the report's whole cost)
    exactly as rendered, re-renders a slide whose summary changed (rescored) or whose entry
    is unreadable, and forgets slides no longer there."""
    from tilscore.report.cohort import MAPS_CACHE_DIR, MapsCache, build_report, render_slide_maps

    out, _ = cohort
    copy = tmp_path / "out"
    for name in ("alpha", "beta"):
        shutil.copytree(out / name, copy / name)
    build_report(copy)
    cache_dir = copy / MAPS_CACHE_DIR
    assert sorted(p.stem for p in cache_dir.glob("*.json")) == ["alpha", "beta"]
    cache = MapsCache(cache_dir)
    fresh = render_slide_maps(copy / "alpha")
    assert fresh.regions_uri and fresh.density_uri and fresh.overlay_uri
    assert cache.get(copy / "alpha") == fresh  # from the cache, identical

    entry = cache_dir / "alpha.json"
    key = json.loads(entry.read_text())["key"]
    _edit(copy / "alpha", lambda s: {**s, "runtime_s": s["runtime_s"] + 1})  # "rescored"
    assert cache.get(copy / "alpha") == fresh
    assert json.loads(entry.read_text())["key"] != key
    entry.write_text("{not json")
    assert cache.get(copy / "alpha") == fresh  # unreadable: rendered again, rewritten
    assert json.loads(entry.read_text())["maps"]["regions_uri"] == fresh.regions_uri

    shutil.rmtree(copy / "beta")
    build_report(copy)
    assert [p.stem for p in cache_dir.glob("*.json")] == ["alpha"]


def test_plots_and_colormap_units():
    from tilscore.report import plots as rp

    assert rp.colormap_rgb(np.array([0.0, 1.0])).tolist() == [[68, 1, 84], [253, 231, 37]]
    assert rp.nice_ticks(42.0) == [0, 10, 20, 30, 40, 50]
    colors = {0: (0, 0, 0, 0), 1: (200, 0, 0, 255), 2: (0, 150, 0, 255)}
    rgba = rp.labels_rgba(np.array([[0, 1], [2, 9]]), colors)
    assert rgba[0, 1].tolist() == [200, 0, 0, 255] and rgba[1, 1, 3] == 0
    points = [rp.Point(1.0, "s1"), rp.Point(2.0, "s2"), rp.Point(9.0, "s3")]
    svg = rp.strip_box_svg([("a<b", points)], title="t", unit="u")
    assert 'data-group="a&lt;b" data-n="3"' in svg and svg.count("<circle") == 3


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome",
                                           "chrome", "headless_shell",
                                           "chromium-headless-shell") if shutil.which(n)),
                None)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    """The page renders (not blank) and the browser's DOM holds every slide's row."""
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary found (apt-get install chromium)")
    from PIL import Image

    path, page = report
    url = path.resolve().as_uri()
    shot = tmp_path / "report.png"
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,2000", url],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1400)
    assert img.std() > 20, "screenshot is blank"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500, "too few colours: nothing drawn"
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    dumped = Page()
    dumped.feed(dom)
    assert sorted(dumped.rows) == sorted(page.rows)
    assert "<svg" in dom and "tilscore report" in dom
    # at 1,400 px the QC column lies inside the window (it was behind a sideways scroll)
    probe = path.with_name("report-probe.html")
    probe.write_text(path.read_text().replace("</body>", (
        "<script>var th = Array.from(document.querySelectorAll('#cohort th'))"
        ".find(function(h){return h.textContent.trim() === 'QC';}); "
        "var r = th.getBoundingClientRect(); document.body.setAttribute('data-qc', "
        "th.textContent + ' ' + r.right + ' ' + window.innerWidth);</script></body>")))
    dom = subprocess.run([*flags, "--window-size=1400,900", "--dump-dom",
                          probe.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    probe.unlink()
    label, right, width = dom.split('data-qc="', 1)[1].split('"', 1)[0].rsplit(" ", 2)
    assert label == "QC" and float(right) <= float(width) == 1400
    # Sorting: click "sTIL %" twice (descending); the IHC slide without a value stays last.
    col = page.heads.index("sTIL %")
    click = f"<script>var h = document.querySelectorAll('#cohort th')[{col}]; h.click(); " \
            "h.click();</script></body>"
    sorted_page = path.with_name("report-sorted.html")
    sorted_page.write_text(path.read_text().replace("</body>", click))
    dom = subprocess.run([*flags, "--dump-dom", sorted_page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    sorted_page.unlink()
    order = [m.split('"')[1] for m in dom.split('<tr data-slide=')[1:]
             if m.split('"')[1] in page.rows]
    til = {k: float(v["sTIL %"]) for k, v in page.rows.items() if v["sTIL %"]}
    assert order == sorted(til, key=til.get, reverse=True) + ["delta"]


def test_ihc_section_without_a_compartment_model(cohort, tmp_path):
    """--model none: no region map or tumour/stroma/other legend, no "(/mm²)" in empty
    cells, H-score and intensity bins shown, and a model line that says what "none" is."""
    from tilscore.report.cohort import write_report

    out, _ = cohort
    copy = tmp_path / "out"
    shutil.copytree(out / "delta", copy / "nomodel")

    def no_model(s):
        s.update(slide="nomodel", model={"name": "none", "version": "0.1.0", "sha256": "none"},
                 h_score=31.5, intensity_bins={"none": 308, "weak": 30, "moderate": 10,
                                               "strong": 4},
                 percent_positive_by_compartment={"tumour": None, "stroma": None,
                                                  "other": None, "tissue": 12.5},
                 positive_rule={"compartment": "ring"})
        # where the pipeline records the bins used (score_settings_used)
        s["score_config"].update(dab_bin_weak_od=0.461, dab_bin_moderate_od=0.921,
                                 dab_bin_strong_od=1.382)
        for cls in s["counts"]:
            for comp in ("tumour", "stroma", "other"):
                s["counts"][cls][comp] = s["densities_per_mm2"][cls][comp] = None
        s["areas_mm2"] = {k: (v if k == "tissue" else None) for k, v in s["areas_mm2"].items()}
        return s

    _edit(copy / "nomodel", no_model)
    html = write_report(copy).read_text()
    section = html.split('<section class="slide"', 1)[1]
    assert "(/mm²)" not in html and "swatch" not in section and "region map" not in section
    assert "no compartment model" in section and "sha256 none" not in html
    assert "none 0.1.0" not in html
    assert "H-score" in section and "31.5" in section
    for label, n in (("none (negative)", 308), ("weak (positive, &lt; 0.921 OD)", 30),
                     ("moderate (0.921–1.382 OD)", 10), ("strong (≥ 1.382 OD)", 4)):
        assert f"<td>{label}</td><td class=\"n\" data-value=\"{n}\">" in section, label
    cells = section.split("Cells: count", 1)[1].split("</table>", 1)[0]
    assert "<th>tissue</th>" in cells and "<th>tumour</th>" not in cells
    page = _page(copy / "report.html")
    assert float(page.rows["nomodel"]["H-score"]) == 31.5
