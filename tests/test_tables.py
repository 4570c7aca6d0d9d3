"""The cohort tables and the summaries they come from (issue 19): malformed summaries mean
"rescore", never a crash; a slide missing an output is redone; scores.csv carries QC
flags and warnings, the IHC settings used, no all-empty columns, and is rebuilt by
`tilscore report`; no CSV cell starts a spreadsheet formula."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_he_slides
from tilscore.cli import main
from tilscore.io.atomic import read_csv_value, spreadsheet_safe, write_csv

SIDE_PX = 1024


@pytest.fixture(scope="module")
def he_slides(tmp_path_factory) -> list[Path]:
    return synthetic_he_slides(tmp_path_factory.mktemp("tables-slides"), "t", 4, SIDE_PX,
                               seed=40)


@pytest.fixture(scope="module")
def scored(he_slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tables") / "out"
    assert main(["score", *map(str, he_slides), "--out", str(out), "--device", "cpu", "-q",
                 "--no-report"]) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _copy(scored: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(scored, out)
    return out


def _score(slides, out: Path, *extra) -> int:
    return main(["score", *map(str, slides), "--out", str(out), "--device", "cpu", "-q",
                 "--no-report", *extra])


# -- item 5: summaries are validated where read -----------------------------------------

MALFORMED = {
    "t0": "[1, 2, 3]\n",  # a JSON list
    "t1": lambda s: {**s, "model": "he-default"},  # model a string
    "t2": lambda s: {**s, "qc": "fine"},  # qc a string
}


def _spoil(out: Path) -> None:
    for name, how in MALFORMED.items():
        path = out / name / "summary.json"
        if isinstance(how, str):
            path.write_text(how)
        else:
            path.write_text(json.dumps(how(json.loads(path.read_text()))))


def test_malformed_summaries_are_incomplete_in_the_report_and_rescored(
        scored, he_slides, tmp_path, capsys, caplog):
    """A summary that is a list, or whose model or qc is a string, made `score`
    (skip-check) and `report` fail with AttributeError and nothing was scored."""
    out = _copy(scored, tmp_path)
    _spoil(out)
    assert main(["report", str(out)]) == 0  # the fourth slide is fine
    html = (out / "report.html").read_text()
    for name in MALFORMED:
        assert f"{out / name / 'summary.json'}: malformed summary (" in html
    assert [r["slide"] for r in _rows(out / "scores.csv")] == ["t3"]  # rebuilt, valid only
    capsys.readouterr()
    assert _score(he_slides, out) == 0
    assert "3 scored, 1 skipped" in capsys.readouterr().out
    for name in MALFORMED:  # each named, with what to do
        assert f"{out / name / 'summary.json'}: malformed summary" in caplog.text
    assert "not complete: rescore it" in caplog.text
    assert sorted(r["slide"] for r in _rows(out / "scores.csv")) == ["t0", "t1", "t2", "t3"]


def test_a_slide_missing_an_output_is_redone(scored, he_slides, tmp_path, capsys):
    """Only a missing summary.json used to make a rerun redo a slide."""
    out = _copy(scored, tmp_path)
    (out / "t0" / "cells.csv").unlink()
    shutil.rmtree(out / "t1" / "maps.zarr")
    (out / "t2" / "overlay.png").unlink()
    assert _score(he_slides, out) == 0
    assert "3 scored, 1 skipped" in capsys.readouterr().out
    for name in ("t0", "t1", "t2"):
        assert not __import__("tilscore.summary").summary.missing_outputs(out / name)


def test_the_summary_schema_accepts_what_the_pipeline_writes(scored):
    from tilscore.summary import SummaryProblem, check_summary, read_summary

    summary = read_summary(scored / "t0" / "summary.json")
    assert check_summary(summary) is summary
    for bad in ([], {"slide": "x"}, {**summary, "warnings": "none"},
                {**summary, "metadata": {"a": 1}}, {**summary, "qc": {"flags": ["blur"]}},
                {**summary, "counts": {"lymphocyte": 3}}):
        with pytest.raises(ValueError):
            check_summary(bad)
    with pytest.raises(FileNotFoundError):
        read_summary(scored / "nothing" / "summary.json")
    path = scored.parent / "latin1.json"
    path.write_bytes(b'{"slide": "\xe9"}')
    with pytest.raises(SummaryProblem, match="latin1.json: unreadable"):
        read_summary(path)


# -- item 15: scores.csv ----------------------------------------------------------------

def test_scores_csv_has_qc_flags_and_warnings(tmp_path):
    """QC flags and warnings were absent from scores.csv: a blank image warns that no
    tissue was found; the slide with nothing to say has the columns, empty."""
    from PIL import Image

    from tilscore.synth.writer import write_synthetic_slide

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    ok = write_synthetic_slide(tmp_path / "ok.tiff", stain="he", seed=3,
                               size_px=(SIDE_PX, SIDE_PX), mpp=0.25).slide_path
    out = tmp_path / "out"
    assert _score([blank, ok], out, "--mpp", "0.5") == 0
    rows = {r["slide"]: r for r in _rows(out / "scores.csv")}
    summary = json.loads((out / "blank" / "summary.json").read_text())
    assert summary["warnings"]
    assert rows["blank"]["warnings"] == "; ".join(summary["warnings"])
    assert "no tissue detected" in rows["blank"]["warnings"]
    assert rows["blank"]["qc.flags"] == "; ".join(f["code"] for f in summary["qc"]["flags"])
    assert "warnings" in rows["ok"] and "qc.flags" in rows["ok"]


def test_ihc_scores_csv_has_the_settings_used_and_no_all_empty_columns(tmp_path):
    """score_config.*_dab_* were empty in IHC runs (the values used were elsewhere), and
    --model none left 30 columns empty for every row."""
    from tilscore.synth.writer import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "f.tiff", stain="foxp3", seed=5,
                                  size_px=(SIDE_PX, SIDE_PX), mpp=0.25).slide_path
    out = tmp_path / "out"
    assert _score([slide], out, "--stain", "foxp3", "--model", "none") == 0
    (row,) = _rows(out / "scores.csv")
    assert row["score_config.foxp3_dab_threshold_od"] == "1.2"
    assert [row[f"score_config.dab_bin_{b}_od"] for b in ("weak", "moderate", "strong")] == [
        "0.461", "0.921", "1.382"]
    assert "score_config.cd20_dab_threshold_od" not in row  # not this stain's setting
    empty = [k for k, v in row.items() if v == "" and k not in ("qc.flags", "warnings")]
    assert empty == []
    assert "areas_mm2.tumour" not in row and row["areas_mm2.tissue"]


def test_report_rebuilds_scores_csv_from_the_summaries(scored, tmp_path):
    """The README says scores.csv is rebuilt from the summaries; `tilscore report` did
    not rebuild it."""
    out = _copy(scored, tmp_path)
    (out / "scores.csv").unlink()
    path = out / "t1" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "stromal_til_percent": 12.5}))
    shutil.rmtree(out / "t3")
    assert main(["report", str(out)]) == 0
    rows = {r["slide"]: r for r in _rows(out / "scores.csv")}
    assert sorted(rows) == ["t0", "t1", "t2"] and rows["t1"]["stromal_til_percent"] == "12.5"


# -- item 9: spreadsheet formula injection ----------------------------------------------

HOSTILE = {"formula": "=HYPERLINK(\"http://x\",\"click\")", "dde": "-2+3+cmd|' /C calc'!A0",
           "plus": "+1+1", "at": "@SUM(A1:A2)", "dash": "-"}
PLAIN = {"negative": "-3.5", "exponent": "-1e-3", "positive": "+7", "text": "P-12",
         "inner": "a=b"}


@pytest.mark.parametrize("value", [*HOSTILE.values(), "\t=1+2", "\rfoo"])
def test_text_that_starts_a_formula_is_neutralised(value):
    assert spreadsheet_safe(value) == "'" + value
    assert read_csv_value(spreadsheet_safe(value)) == value


@pytest.mark.parametrize("value", [*PLAIN.values(), -2.5, 3, None, True, ""])
def test_numbers_and_plain_text_are_unchanged(value):
    assert spreadsheet_safe(value) == value


def test_write_csv_keeps_negative_numbers_numbers(tmp_path):
    write_csv(tmp_path / "t.csv", ["a", "b"], rows=[{"a": -2.5, "b": "=1+2"}])
    assert (tmp_path / "t.csv").read_text() == "a,b\n-2.5,'=1+2\n"


def test_manifest_values_and_errors_cannot_start_a_formula_in_the_tables(he_slides, tmp_path):
    """Manifest metadata went verbatim into scores.csv, which statisticians open in
    Excel; an error line starts with the input's name, which can be anything."""
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", *HOSTILE, *PLAIN])
        w.writerow([he_slides[0], *HOSTILE.values(), *PLAIN.values()])
    evil = tmp_path / "=1+2.svs"  # missing: its error line starts with its name
    out = tmp_path / "out"
    assert _score([manifest, evil], out) == 1
    (row,) = _rows(out / "scores.csv")
    for key, value in HOSTILE.items():
        assert row[f"metadata.{key}"] == "'" + value, key
    for key, value in PLAIN.items():
        assert row[f"metadata.{key}"] == value, key
    # every cell is text that starts no formula, or a plain number
    assert all(spreadsheet_safe(v) == v for v in row.values())
    (failure,) = _rows(out / "failures.csv")
    assert failure["error"].startswith("'=1+2.svs")
    from tilscore.report.cohort import _read_failures

    assert _read_failures(out / "failures.csv")[0]["error"].startswith("=1+2.svs")
