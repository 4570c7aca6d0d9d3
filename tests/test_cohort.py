"""From slides to the study: samples.csv, the survival statistics (checked against
lifelines' documented Rossi example), cohort_stats.csv and the report's study section.

Summaries are built in code (no scoring), so the module runs in seconds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tilscore.errors import UsageError
from tilscore.samples import SampleColumns, build_samples, write_samples

pytest.importorskip("lifelines")


def _he(slide, patient, sample, til, lymph_stroma=1000.0, **meta):
    return {"slide": slide, "stain": "he", "model": {"name": "he-default"},
            "metadata": {"patient_id": patient, "sample_id": sample, **meta},
            "areas_mm2": {"tissue": 1.0, "tumour": 0.4, "stroma": 0.5},
            "counts": {"lymphocyte": {"tumour": 40, "stroma": int(lymph_stroma * 0.5),
                                      "tissue": 40 + int(lymph_stroma * 0.5)}},
            "densities_per_mm2": {"lymphocyte": {"tumour": 100.0, "stroma": lymph_stroma,
                                                 "tissue": 40 + lymph_stroma * 0.5}},
            "stromal_til_percent": til, "til_score_tiger": til * 0.8,
            "qc": {"flags": []}, "warnings": []}


def _ihc(slide, stain, patient, sample, pos_stroma, pos_tumour=50.0, stroma_mm2=0.5,
         **meta):
    cls = f"{stain}_positive"
    n_s, n_t = round(pos_stroma * stroma_mm2), round(pos_tumour * 0.4)
    return {"slide": slide, "stain": stain, "model": {"name": "he-default"},
            "metadata": {"patient_id": patient, "sample_id": sample, **meta},
            "areas_mm2": {"tissue": 1.0, "tumour": 0.4, "stroma": stroma_mm2},
            "counts": {cls: {"tumour": n_t, "stroma": n_s, "tissue": n_t + n_s},
                       "negative": {"tumour": 1000, "stroma": 500, "tissue": 1500}},
            "densities_per_mm2": {cls: {"tumour": pos_tumour, "stroma": pos_stroma,
                                        "tissue": n_t + n_s}},
            "percent_positive": 100 * (n_t + n_s) / (n_t + n_s + 1500),
            "qc": {"flags": []}, "warnings": []}


# -- samples.csv --------------------------------------------------------------------------

def test_samples_rows_state_missing_stains_and_pool_duplicates():
    s1 = _he("A-he", "P1", "A", 20.0)
    s1["qc"]["flags"] = [{"code": "blur", "message": "out of focus"}]
    summaries = [
        s1, _ihc("A-cd20", "cd20", "P1", "A", 400.0), _ihc("A-foxp3", "foxp3", "P1", "A", 80.0),
        # sample B: no FOXP3 slide, two CD20 slides (stroma 0.5 and 1.5 mm²)
        _he("B-he", "P1", "B", 30.0),
        _ihc("B-cd20a", "cd20", "P1", "B", 100.0, stroma_mm2=0.5),
        _ihc("B-cd20b", "cd20", "P1", "B", 300.0, stroma_mm2=1.5),
    ]
    summaries[-1]["warnings"] = ["no stroma inside the tumour bulk"]
    rows = {r["sample_id"]: r for r in build_samples(summaries)}
    a, b = rows["A"], rows["B"]
    assert a["patient_id"] == b["patient_id"] == "P1"
    assert a["n_slides"] == 3 and b["n_slides"] == 3
    assert a["slides.he"] == "A-he" and a["slides.cd20"] == "A-cd20"
    assert a["stains_missing"] == "" and a["duplicates"] == ""
    assert a["he.stromal_til_percent"] == 20.0
    assert a["cd20.densities_per_mm2.cd20_positive.stroma"] == pytest.approx(400.0)
    assert a["foxp3.densities_per_mm2.foxp3_positive.stroma"] == pytest.approx(80.0)
    assert a["qc.flags"] == "A-he: blur"
    assert b["stains_missing"] == "foxp3"
    assert b["slides.foxp3"] == "" and "foxp3.percent_positive" not in b
    assert b["slides.cd20"] == "B-cd20a; B-cd20b"
    assert b["duplicates"] == "cd20: 2 slides (B-cd20a, B-cd20b), pooled"
    # pooled density: (100 × 0.5 + 300 × 1.5) / (0.5 + 1.5) = 250, not the mean 200
    assert b["cd20.densities_per_mm2.cd20_positive.stroma"] == pytest.approx(250.0)
    assert b["warnings"] == "B-cd20b: no stroma inside the tumour bulk"


def test_slide_without_sample_id_is_its_own_sample_and_metadata_conflicts_are_warned():
    s = _he("lonely", "", "", 10.0)
    s["metadata"] = {}
    a = _he("x-he", "P2", "X", 5.0, sample_type="primary")
    b = _ihc("x-cd20", "cd20", "P2", "X", 10.0, sample_type="metastasis")
    rows = {r["sample_id"]: r for r in build_samples([s, a, b])}
    assert rows["lonely"]["patient_id"] == "lonely"
    assert "no sample_id" in rows["lonely"]["warnings"]
    assert rows["X"]["metadata.sample_type"] == ""
    assert "slides disagree on sample_type" in rows["X"]["warnings"]


def test_sample_column_names_are_settable(tmp_path):
    s = _he("s1", "", "", 12.0)
    s["metadata"] = {"case": "C9", "block": "B1"}
    rows = build_samples([s], SampleColumns("case", "block"))
    assert rows[0]["case"] == "C9" and rows[0]["block"] == "B1"


def test_write_samples_reads_the_slide_folders(tmp_path):
    for s in (_he("A-he", "P1", "A", 20.0), _ihc("A-cd20", "cd20", "P1", "A", 400.0)):
        (tmp_path / s["slide"]).mkdir()
        (tmp_path / s["slide"] / "summary.json").write_text(json.dumps(s))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{")
    path = write_samples(tmp_path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["stains_missing"] == "foxp3"
    assert float(rows[0]["he.stromal_til_percent"]) == 20.0
    header = list(rows[0])
    assert header[:3] == ["patient_id", "sample_id", "n_slides"]


# -- statistics: correctness against lifelines' documented Rossi example -------------------

# lifelines docs, "Survival regression", cph.fit(rossi, duration_col='week',
# event_col='arrest'); cph.print_summary() (2 decimals as printed there):
# covariate: coef, exp(coef), se(coef), coef lower 95%, coef upper 95%,
#            exp(coef) lower 95%, exp(coef) upper 95%, z, p
ROSSI_PRINTED = {
    "fin": (-0.38, 0.68, 0.19, -0.75, -0.00, 0.47, 1.00, -1.98, 0.05),
    "age": (-0.06, 0.94, 0.02, -0.10, -0.01, 0.90, 0.99, -2.61, 0.01),
    "race": (0.31, 1.37, 0.31, -0.29, 0.92, 0.75, 2.50, 1.02, 0.31),
    "wexp": (-0.15, 0.86, 0.21, -0.57, 0.27, 0.57, 1.30, -0.71, 0.48),
    "mar": (-0.43, 0.65, 0.38, -1.18, 0.31, 0.31, 1.37, -1.14, 0.26),
    "paro": (-0.08, 0.92, 0.20, -0.47, 0.30, 0.63, 1.35, -0.43, 0.66),
    "prio": (0.09, 1.10, 0.03, 0.04, 0.15, 1.04, 1.16, 3.19, None),  # p printed "<0.005"
}


def test_cox_matches_lifelines_documented_rossi_summary():
    from lifelines.datasets import load_rossi

    from tilscore.report.survival import fit_cox

    model = fit_cox(load_rossi(), duration_col="week", event_col="arrest")
    assert model.n == 432 and model.events == 114
    terms = {t.name: t for t in model.terms}
    assert list(terms) == list(ROSSI_PRINTED)
    for name, printed in ROSSI_PRINTED.items():
        t = terms[name]
        got = (t.coef, t.hr, t.se, t.coef_low, t.coef_high, t.hr_low, t.hr_high, t.z, t.p)
        for value, want in zip(got, printed, strict=True):
            if want is not None:
                assert round(value, 2) == pytest.approx(want, abs=1e-9), (name, got)
    assert terms["prio"].p < 0.005
    assert round(model.log_likelihood, 2) == -658.75  # "partial log-likelihood = -658.75"
    assert round(model.lr_statistic, 2) == 33.27 and model.lr_df == 7  # "33.27 on 7 df"
    assert round(model.concordance, 2) == 0.64
    assert round(-math.log2(model.lr_p), 2) == 15.37  # "-log2(p) of ll-ratio test = 15.37"


def test_logrank_matches_lifelines_documented_example():
    from lifelines.datasets import load_rossi
    from lifelines.statistics import logrank_test

    from tilscore.report.survival import logrank

    # lifelines docs, "More examples and recipes" > Logrank test: multivariate_logrank_test
    # on these 12 durations in 3 groups prints test_statistic 1.0800, p 0.5827 (df = 2)
    chi2, df, p = logrank([5, 3, 9, 8, 7, 4, 4, 3, 2, 5, 6, 7],
                          [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0],
                          groups=[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    assert round(chi2, 4) == 1.0800 and df == 2 and round(p, 4) == 0.5827
    # two groups: the same as lifelines' logrank_test (Rossi, financial aid or not)
    r = load_rossi()
    chi2, df, p = logrank(r["week"], r["arrest"], groups=r["fin"])
    a, b = r[r.fin == 1], r[r.fin == 0]
    ref = logrank_test(a.week, b.week, a.arrest, b.arrest)
    assert df == 1 and round(chi2, 2) == 3.84 and round(p, 3) == 0.050
    assert chi2 == pytest.approx(ref.test_statistic) and p == pytest.approx(ref.p_value)


# -- statistics on a cohort ---------------------------------------------------------------

def _simulated_cohort(n=60, hr_per_sd=0.5, seed=1):
    """n patients, one sample each (H&E + CD20), CD20 stroma density log-normal; survival
    exponential with HR `hr_per_sd` per SD of log(density + 1); censoring at 10."""
    rng = np.random.default_rng(seed)
    dens = np.exp(rng.normal(5.5, 1.0, n))
    z = (np.log(dens + 1) - np.log(dens + 1).mean()) / np.log(dens + 1).std(ddof=1)
    beta = math.log(hr_per_sd)
    t = rng.exponential(1.0 / (0.15 * np.exp(beta * z)))
    event = (t < 10).astype(int)
    t = np.minimum(t, 10.0)
    summaries = []
    for i in range(n):
        meta = {"os_months": f"{t[i]:.4f}", "os_event": str(event[i]),
                "sample_type": "primary" if i % 2 else "metastasis"}
        summaries += [_he(f"p{i}-he", f"P{i}", f"S{i}", float(rng.uniform(1, 60)), **meta),
                      _ihc(f"p{i}-cd20", "cd20", f"P{i}", f"S{i}", float(dens[i]), **meta)]
    return summaries


def _row(stats, analysis, variable):
    return next(r for r in stats.rows if r.analysis == analysis and r.variable == variable)


def test_cohort_stats_recover_a_known_hazard_ratio():
    from tilscore.report.survival import cohort_stats

    rows = build_samples(_simulated_cohort(n=120))
    stats = cohort_stats(rows, time_col="os_months", event_col="os_event", level="patient",
                         group_col="metadata.sample_type")
    var = "cd20.densities_per_mm2.cd20_positive.stroma"
    assert var in stats.variables and "he.stromal_til_percent" in stats.variables
    cox = _row(stats, "cox_per_sd_log", var)
    assert cox.n == 120 and cox.events > 40
    assert cox.ci_low < 0.5 < cox.ci_high and cox.estimate < 0.75 and cox.p < 1e-3
    assert _row(stats, "cox_high_vs_low", var).estimate < 1
    assert _row(stats, "km_logrank_median", var).p < 0.05
    assert _row(stats, "km_logrank_tertiles", var).df == 2
    ph = _row(stats, "ph_test_per_sd_log", var)
    assert 0 <= ph.p <= 1 and ph.statistic >= 0
    til = _row(stats, "cox_per_sd_log", "he.stromal_til_percent")  # no effect simulated
    assert til.ci_low < 1 < til.ci_high or til.p > 0.001
    sp = next(r for r in stats.rows if r.analysis == "spearman")
    assert sp.n == 120 and -1 <= sp.estimate <= 1
    mw = _row(stats, "mann_whitney", var)
    assert mw.n == 120 and 0 <= mw.p <= 1
    km = [k for k in stats.km if k.variable == var]
    assert {k.split for k in km} == {"median", "tertiles"}
    assert sum(c.n for c in km[0].curves) == 120


def test_too_few_events_constant_marker_and_missing_survival_are_notes():
    from tilscore.report.survival import cohort_stats

    s = _simulated_cohort(n=12)
    for x in s:
        if x["stain"] == "cd20":
            x["densities_per_mm2"]["cd20_positive"]["stroma"] = 5.0  # constant
            x["counts"]["cd20_positive"]["stroma"] = 2
        x["metadata"]["os_event"] = "0"
    for x in s[:2]:
        x["metadata"]["os_event"] = "1"  # 1 event, both slides of sample S0
    for x in s[2:6]:
        x["metadata"]["os_months"] = ""  # two samples without survival
    stats = cohort_stats(build_samples(s), time_col="os_months", event_col="os_event")
    assert any("2 of 12 patients lack survival data" in n for n in stats.notes)
    cox = _row(stats, "cox_per_sd_log", "he.stromal_til_percent")
    assert cox.estimate is None and "1 events (< 3)" in cox.note
    none = cohort_stats(build_samples(_simulated_cohort(n=8)), time_col=None, event_col=None)
    assert not [r for r in none.rows if r.analysis.startswith("cox")]
    s2 = _simulated_cohort(n=12)
    for x in s2:
        if x["stain"] == "cd20":
            x["densities_per_mm2"]["cd20_positive"]["stroma"] = 5.0
    stats2 = cohort_stats(build_samples(s2), time_col="os_months", event_col="os_event")
    assert "constant marker" in _row(stats2, "cox_per_sd_log",
                                     "cd20.densities_per_mm2.cd20_positive.stroma").note


def test_wilcoxon_on_matched_primary_metastasis_pairs():
    from tilscore.report.survival import cohort_stats

    summaries = []
    for i in range(8):  # each patient: a primary and a metastasis, metastasis lower
        for k, kind in enumerate(("primary", "metastasis")):
            d = 400.0 + 30 * i - 150.0 * k
            summaries.append(_ihc(f"p{i}{kind}", "cd20", f"P{i}", f"P{i}-{kind}", d,
                                  sample_type=kind))
    stats = cohort_stats(build_samples(summaries), time_col=None, event_col=None,
                         group_col="metadata.sample_type")
    var = "cd20.densities_per_mm2.cd20_positive.stroma"
    w = _row(stats, "wilcoxon_paired", var)
    # groups sorted: "metastasis" vs "primary": every difference is −150
    assert w.n == 8 and w.estimate == pytest.approx(-150.0) and w.p < 0.01
    from scipy.stats import wilcoxon

    assert w.p == pytest.approx(wilcoxon(np.full(8, -150.0)).pvalue)


def test_bad_survival_input_is_a_one_line_usage_error(tmp_path):
    from tilscore.report.survival import StudyOptions, attach_survival, read_clinical

    rows = build_samples(_simulated_cohort(n=5))
    with pytest.raises(UsageError, match="no column survival_m"):
        attach_survival(rows, time_col="survival_m", event_col="os_event")
    rows[0]["metadata.os_months"] = "ten"
    with pytest.raises(UsageError, match="survival time 'ten' is not a number"):
        attach_survival(rows, time_col="os_months", event_col="os_event")
    with pytest.raises(UsageError, match="TIME_COL,EVENT_COL"):
        StudyOptions.parse("os_months")
    clin = tmp_path / "clin.csv"
    clin.write_text("patient_id,os,dead\nP0,12,maybe\n")
    with pytest.raises(UsageError, match="event 'maybe'"):
        attach_survival(rows, time_col="os", event_col="dead", clinical=read_clinical(clin))


def test_clinical_csv_joined_on_patient(tmp_path):
    from tilscore.report.survival import attach_survival, read_clinical

    rows = build_samples(_simulated_cohort(n=5))
    clin = tmp_path / "clin.csv"
    clin.write_text("patient_id,os,dead\nP0,12.5,1\nP1,3,0\n")
    got = {r["patient_id"]: (r["__time"], r["__event"])
           for r in attach_survival(rows, time_col="os", event_col="dead",
                                    clinical=read_clinical(clin))}
    assert got["P0"] == (12.5, 1) and got["P1"] == (3.0, 0) and got["P2"] == (None, None)


# -- report and CLI -------------------------------------------------------------------------

def _out_folder(tmp_path: Path, summaries: list[dict]) -> Path:
    out = tmp_path / "out"
    for s in summaries:
        (out / s["slide"]).mkdir(parents=True)
        (out / s["slide"] / "summary.json").write_text(json.dumps(s))
    return out


def test_report_cli_writes_study_section_stats_and_samples(tmp_path, capsys):
    from tilscore.cli import main

    out = _out_folder(tmp_path, _simulated_cohort(n=30))
    rc = main(["report", str(out), "--survival", "os_months,os_event", "--group-by",
               "sample_type"])
    assert rc == 0, capsys.readouterr().err
    html = (out / "report.html").read_text()
    assert 'id="study-section"' in html and html.count('<svg class="km"') >= 4
    with open(out / "cohort_stats.csv", newline="") as fh:
        stats = list(csv.DictReader(fh))
    analyses = {r["analysis"] for r in stats}
    assert {"km_logrank_median", "km_logrank_tertiles", "cox_per_sd_log", "cox_high_vs_low",
            "ph_test_per_sd_log", "spearman", "mann_whitney", "wilcoxon_paired"} <= analyses
    with open(out / "samples.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 30


def test_report_cli_bad_survival_column_exits_2_with_one_line(tmp_path, capsys):
    from tilscore.cli import main

    out = _out_folder(tmp_path, _simulated_cohort(n=5))
    rc = main(["report", str(out), "--survival", "nope,os_event"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no column nope" in err
    assert not (out / "cohort_stats.csv").exists()


def _browser() -> str | None:
    import shutil

    names = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
             "headless_shell")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def test_study_section_renders_in_headless_chromium(tmp_path):
    """The report in a real browser: the KM plots are laid out with drawn curves, and the
    page logs nothing to the console (no script error)."""
    import re
    import subprocess

    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium found (chromium-headless-shell, chromium, google-chrome): "
                    "apt-get install chromium-headless-shell")
    from tilscore.report.cohort import write_report
    from tilscore.report.survival import StudyOptions

    out = _out_folder(tmp_path, _simulated_cohort(n=30))
    path = write_report(out, group_by="sample_type",
                        study=StudyOptions("os_months", "os_event"))
    probe = path.with_name("probe.html")
    probe.write_text(path.read_text().replace("<body>", (
        "<body><script>window.__errors = [];"
        "window.addEventListener('error', function(e){window.__errors.push(e.message);});"
        "</script>"), 1).replace("</body>", (
        "<script>var svgs = document.querySelectorAll('#study-section svg.km');"
        "var drawn = 0, laidOut = 0; svgs.forEach(function(s){"
        " var r = s.getBoundingClientRect(); if (r.width > 100 && r.height > 100) laidOut++;"
        " s.querySelectorAll('path.curve').forEach(function(p){"
        "  if (p.getTotalLength() > 50) drawn++;});});"
        "document.body.setAttribute('data-km', svgs.length + ' ' + laidOut + ' ' + drawn + "
        "' ' + window.__errors.length);</script></body>")))
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000"]
    res = subprocess.run([*flags, "--dump-dom", probe.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    n_svg, laid_out, drawn, errors = (int(v) for v in
                                      res.stdout.split('data-km="', 1)[1].split('"')[0].split())
    n_km = (path.read_text().count('<svg class="km"'))
    # median + tertiles of sTIL % and CD20+ stroma (CD20+ tumour is constant here: a note)
    assert n_svg == n_km == 4 and laid_out == n_svg
    assert drawn >= 2 * n_svg  # every plot has at least two drawn curves
    assert errors == 0
    console = [ln for ln in res.stderr.splitlines() if re.search(r":CONSOLE[:(]\d+", ln)]
    assert not console, console


def test_manifest_end_to_end_missing_stain_duplicate_and_missing_survival(tmp_path, capsys):
    """Score a manifest (a sample with two CD20 slides, one with H&E only, one patient
    without survival data), then report with --survival: samples.csv states the missing
    stains and the duplicate, the summaries and cells.csv carry the spatial measures, and
    the statistics say what they could not compute."""
    from tilscore.cli import main
    from tilscore.models.registry import MODELS_DIR
    from tilscore.synth.writer import write_synthetic_slide

    if not (MODELS_DIR / "he-default" / "card.json").exists():
        pytest.skip("shipped model models/he-default missing")
    rows = [("a-he", "he", "P1", "A", "12", "1"), ("a-cd20-1", "cd20", "P1", "A", "12", "1"),
            ("a-cd20-2", "cd20", "P1", "A", "12", "1"), ("b-he", "he", "P2", "B", "", "")]
    lines = ["path,stain,patient_id,sample_id,os_months,os_event"]
    for k, (name, stain, pid, sid, t, e) in enumerate(rows):
        write_synthetic_slide(tmp_path / f"{name}.tiff", stain=stain, seed=k,
                              size_px=(768, 768), mpp=0.5, workers=1)
        lines.append(f"{name}.tiff,{stain},{pid},{sid},{t},{e}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "m.csv"), "--out", str(out), "--device", "cpu",
                 "--quiet", "--no-report"]) == 0, capsys.readouterr().err
    with open(out / "samples.csv", newline="") as fh:
        samples = {r["sample_id"]: r for r in csv.DictReader(fh)}
    assert samples["A"]["stains_missing"] == "foxp3"
    assert samples["A"]["duplicates"].startswith("cd20: 2 slides (a-cd20-1, a-cd20-2)")
    assert samples["B"]["stains_missing"] == "cd20; foxp3"
    assert float(samples["A"]["he.stromal_til_percent"]) >= 0
    assert float(samples["A"]["cd20.densities_per_mm2.cd20_positive.stroma"]) >= 0
    for name, stain in (("a-he", "he"), ("a-cd20-1", "cd20")):
        s = json.loads((out / name / "summary.json").read_text())
        sp = s["spatial"]
        counted = "lymphocyte" if stain == "he" else "cd20_positive"
        assert sp["counted_class"] == counted
        # every counted cell on tumour or stroma lies in one band
        assert sum(sp["counts"].values()) == (s["counts"][counted]["tumour"]
                                              + s["counts"][counted]["stroma"])
        assert sum(sp["area_mm2"].values()) == pytest.approx(
            s["areas_mm2"]["tumour"] + s["areas_mm2"]["stroma"], rel=1e-6)
        with open(out / name / "cells.csv", newline="") as fh:
            cells = list(csv.DictReader(fh))
        # the compartment is the region around the cell (24 µm): the sign of the
        # distance agrees with it beyond that
        d = {k: [float(c["tumour_distance_um"]) for c in cells if c["compartment"] == k
                 and c["tumour_distance_um"] != "nan"] for k in ("tumour", "stroma")}
        assert d["tumour"] and all(x < 0 for x in d["tumour"] if abs(x) > 30)
        assert all(x > 0 for x in d["stroma"] if abs(x) > 30)
        assert np.mean(np.array(d["tumour"]) < 0) > 0.8
    assert main(["report", str(out), "--survival", "os_months,os_event"]) == 0
    with open(out / "cohort_stats.csv", newline="") as fh:
        stats = list(csv.DictReader(fh))
    cox = [r for r in stats if r["analysis"] == "cox_per_sd_log"]
    assert cox and all(r["estimate"] == "" and "not analysed" in r["note"] for r in cox)
    html = (out / "report.html").read_text()
    assert "1 of 2 patients lack survival data" in html


def test_group_by_a_slide_column_gives_a_note_not_an_error():
    from tilscore.report.survival import cohort_stats

    stats = cohort_stats(build_samples(_simulated_cohort(n=6)), time_col=None, event_col=None,
                         group_col="stain")
    assert any("stain is not a samples.csv column" in n for n in stats.notes)


@pytest.mark.slow
def test_demo_cohort_end_to_end(tmp_path, capsys):
    """``tilscore demo --cohort`` on 4 small patients: slides, scores, samples.csv with a
    missing stain, cohort_stats.csv and the report with its Kaplan–Meier plots."""
    from tilscore.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--cohort", "--patients", "5", "--size", "768", "--out", str(out),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    truth = json.loads((out / "cohort" / "cohort_truth.json").read_text())
    assert truth["hr_per_sd_of_log_cd20_stroma_density"] == 0.5
    with open(out / "samples.csv", newline="") as fh:
        samples = list(csv.DictReader(fh))
    assert len(samples) == 5 + 3
    assert {s["stains_missing"] for s in samples} == {"", "foxp3"}
    with open(out / "cohort_stats.csv", newline="") as fh:
        analyses = {r["analysis"] for r in csv.DictReader(fh)}
    assert {"cox_per_sd_log", "spearman", "mann_whitney", "wilcoxon_paired"} <= analyses
    assert 'id="study-section"' in (out / "report.html").read_text()
