"""Command line: thin wrappers that parse, call library functions, map errors to exits.

Exit codes (DESIGN.md): 0 all inputs done; 1 some input failed (the others were still
processed); 2 bad usage or configuration. Errors are one line on stderr; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from tilscore.engine.defaults import BATCH_SIZE, DEFAULT_DECODE
from tilscore.errors import TilscoreError, UsageError
from tilscore.inputs import check_stain
from tilscore.interrupt import Interrupted, stop_on_signals
from tilscore.io.atomic import write_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Score tumour-infiltrating lymphocytes on whole-slide images.",
)
_state = {"debug": False, "command": None}  # command: the command line main() was given
log = logging.getLogger("tilscore")


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
):
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="Slide or image file.")],
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    mpp: Annotated[float | None, typer.Option(help="Override µm/px at level 0.")] = None,
):
    """Show a slide's format, size, pyramid levels and pixel size."""
    from tilscore.slide.info import slide_info  # lazy: keeps `tilscore --help` fast

    data = slide_info(slide, mpp=mpp)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "levels":
            for k, lv in enumerate(value):
                typer.echo(f"  level {k}: {lv['width']} x {lv['height']} (x{lv['downsample']:.2f})")
        else:
            typer.echo(f"{key}: {value}")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output .tiff path.")],
    *,
    stain: Annotated[str, typer.Option(help="he, cd20 or foxp3.")] = "he",
    seed: Annotated[int, typer.Option(help="Random seed (layout and cells).")] = 0,
    size: Annotated[tuple[int, int], typer.Option(help="Width and height in px.")] = (8192, 8192),
    mpp: Annotated[float, typer.Option(help="µm/px at level 0.")] = 0.25,
    pen: Annotated[bool, typer.Option("--pen", help="Draw pen marks.")] = False,
    blur: Annotated[float, typer.Option(help="Gaussian blur sigma in px (QC tests).")] = 0.0,
):
    """Write a synthetic pyramidal TIFF slide with exact ground truth beside it."""
    from tilscore.synth.writer import write_synthetic_slide  # lazy: keeps `tilscore --help` fast

    check_stain(stain)
    res = write_synthetic_slide(
        out, stain=stain, seed=seed, size_px=size, mpp=mpp, pen_marks=pen, blur_sigma_px=blur
    )
    typer.echo(f"wrote {res.slide_path} (truth: {res.truth_path})")


@app.command()
def score(
    inputs: Annotated[list[str], typer.Argument(
        help="Slides, images, folders, globs ('slides/*.svs') or CSV manifests.")],
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out"),
    stain: Annotated[str, typer.Option(help="he, cd20 or foxp3 (a manifest may set it "
                                            "per slide).")] = "he",
    mpp: Annotated[float | None, typer.Option(help="Override µm/px (plain images).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    devices: Annotated[str | None, typer.Option(
        help="One worker process per device: 'cuda:0,cuda:1' or 'all' (default with "
             "several GPUs and --device auto).")] = None,
    workers: Annotated[int, typer.Option(min=1, max=4096, help="Slide worker processes (CPU nodes, "
                                                     "or per --cluster).")] = 1,
    cluster: Annotated[str | None, typer.Option(
        help="Dask: 'local', 'tcp://HOST:8786' (a running scheduler) or 'slurm'.")] = None,
    cluster_config: Annotated[Path | None, typer.Option(
        help="YAML with Slurm settings (default configs/cluster.yaml).")] = None,
    model: Annotated[str | None, typer.Option(
        help="Model name or folder; 'none' on IHC: no compartment model, densities over "
             "all tissue only.")] = None,
    mode: Annotated[str, typer.Option(
        help="full, or fast (H&E): regions at 2 µm/px everywhere, lymphocytes searched only "
             "in the tumour bulk's stroma (what the sTIL score counts).")] = "full",
    region_model: Annotated[str | None, typer.Option(
        help="Region model of --mode fast.", show_default="he-regions")] = None,
    config: Annotated[Path | None, typer.Option(help="Score config YAML.")] = None,
    read_threads: Annotated[int | None, typer.Option(
        min=1, max=1024, help="Tile decoding threads per slide.",
        show_default="2 on CPU, the cores minus 2 on CUDA")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, max=4096, help="Tiles per model batch.",
        show_default=f"{BATCH_SIZE['cpu']} on CPU, {BATCH_SIZE['cuda']} on CUDA")] = None,
    decode: Annotated[str, typer.Option(
        help="Where JPEG tiles are decoded: auto (on the GPU with CUDA, where the slide "
             "allows it), host or device.")] = DEFAULT_DECODE,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the network and its decoding (tens of seconds "
                          "of compilation; no gain measured yet: docs/benchmarks.md).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Re-score slides whose outputs already exist.")] = False,
    fail_fast: Annotated[bool, typer.Option(
        "--fail-fast", help="Stop at the first failing slide.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    log_file: Annotated[Path | None, typer.Option(
        help="Append a timestamped log of every slide (for cluster jobs).")] = None,
    report: Annotated[bool, typer.Option(
        "--report/--no-report", help="Write or refresh DIR/report.html at the end.")] = True,
    patient_column: Annotated[str, typer.Option(
        help="Manifest column naming a slide's patient (samples.csv).")] = "patient_id",
    sample_column: Annotated[str, typer.Option(
        help="Manifest column naming a slide's sample (samples.csv).")] = "sample_id",
):
    """Score slides; writes DIR/<slide_id>/ outputs, DIR/scores.csv, DIR/failures.csv and
    DIR/report.html."""
    # lazy: keeps `tilscore --help` fast
    from tilscore.batch import BatchOptions, score_inputs
    from tilscore.scoring.score_config import load_score_config

    check_stain(stain)
    if log_file is not None:
        _log_to_file(log_file)
    opts = BatchOptions(
        stain=stain, model=model, device=device, cfg=load_score_config(config), mpp=mpp,
        devices=tuple(d.strip() for d in devices.split(",") if d.strip()) if devices else (),
        overwrite=overwrite, fail_fast=fail_fast, quiet=quiet, read_threads=read_threads,
        batch_size=batch_size, compile=compile_model, decode=decode, mode=mode,
        region_model=region_model, cluster=cluster, workers=workers,
        cluster_config=cluster_config,
        report=report, command=_state.get("command") or " ".join(sys.argv),
        sample_columns=(patient_column, sample_column))
    with stop_on_signals():  # SIGTERM/SIGINT: no new slide, tables written, one line
        result = score_inputs(inputs, out, opts=opts)
    for row in result.rows:
        done = (" (scored by another run)" if row["slide"] in result.elsewhere
                else " (already scored; --overwrite redoes it)"
                if row["slide"] in result.skipped else "")
        typer.echo(f"{row['slide']}: {_headline(row)}{done}")
    for failure in result.failures:
        name, error = Path(failure["input"]).name, failure["error"]
        typer.echo(f"tilscore: error: {error if error.startswith(name) else name + ': ' + error}",
                   err=True)
    typer.echo(f"{len(result.scored)} scored, {len(result.skipped)} skipped (already done), "
               f"{len(result.failures)} failed; outputs in {out.resolve()}")
    if result.failures:
        raise typer.Exit(1)


def _log_to_file(path: Path) -> None:
    """INFO and above from tilscore to `path` (appended), without changing the console."""
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write log file {path}: {exc.strerror}") from exc
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    for h in root.handlers:  # the console keeps the level --verbose/--debug chose
        h.setLevel(root.level)
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)  # one log file per run (main() may be called again)
        old.close()
    log.addHandler(handler)


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="Training config YAML.")] = Path(
        "configs/train_he.yaml"),
    *,
    data: Annotated[list[str] | None, typer.Option(
        help="Labelled-tile folder(s) (any supported format); replaces the config's data.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")] = Path(
        "runs/model"),
    max_steps: Annotated[int | None, typer.Option(help="Override max_steps.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoint.")] = False,
):
    """Train a model on labelled tiles; writes weights.safetensors + card.json into --out."""
    # lazy: keeps `tilscore --help` fast
    from tilscore.training.train import train as run_training
    from tilscore.training.train_config import load_train_config

    overrides = {}
    if data:
        overrides["data"] = [{"kind": "auto", "path": d} for d in data]
    cfg = load_train_config(config, **overrides)
    card = run_training(cfg, out, resume=resume, device=device, max_steps=max_steps)
    val = card.metrics.get("validation", {})
    shown = (("lymphocyte F1", "lymphocyte_f1") if "lymphocyte_f1" in val
             else ("Dice tumour", "dice_tumour"))
    typer.echo(f"wrote {out / card.weights_file} (sha256 {card.sha256[:12]}…); "
               f"validation {shown[0]} {val.get(shown[1], float('nan')):.3f}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model name or folder.")] = "he-default",
    *,
    data: Annotated[str, typer.Option(help="Labelled-tile folder, or 'synthetic'.")] = "synthetic",
    split: Annotated[str, typer.Option(help="val, train or all (val needs a split).")] = "val",
    radius_um: Annotated[float, typer.Option(help="Match radius in µm.")] = 3.3,
    mpp: Annotated[float | None, typer.Option(help="µm/px of the data if unknown.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics JSON.")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Store the best peak threshold in the model's card.")] = False,
):
    """Lymphocyte detection P/R/F1, threshold sweep, FROC, region Dice and the region at
    typed nuclei (balanced accuracy) on labelled tiles."""
    # lazy: keeps `tilscore --help` fast
    from tilscore.engine.infer import select_device
    from tilscore.models import load_model
    from tilscore.models.registry import resolve_model_dir
    from tilscore.training.eval_data import eval_tiles
    from tilscore.training.eval_model import evaluate_model

    net, card = load_model(model)
    dev = select_device(device)
    tiles = eval_tiles(data, card.input_mpp, split=split, mpp=mpp)
    metrics = evaluate_model(net.to(dev), card, tiles=tiles, device=dev, radius_um=radius_um)
    metrics.update({"model": card.name, "data": data, "split": split, "tiles": len(tiles),
                    "radius_um": radius_um})
    cells = "lymphocyte_f1" in metrics  # False for a region-only model
    if calibrate and not cells:
        raise UsageError(f"--calibrate: model {card.name} has no lymphocyte heatmap")
    if cells:
        for key in ("precision", "recall", "f1"):
            typer.echo(f"lymphocyte {key:9s} {metrics['lymphocyte_' + key]:.3f}")
        typer.echo(f"(threshold {metrics['threshold']:.2f}; best "
                   f"{metrics['best_threshold']:.2f} "
                   f"F1 {metrics['sweep_f1'][metrics['best_threshold']]:.3f})")
    for k, v in metrics.items():
        if k.startswith("dice_") or (k.startswith("region_") and isinstance(v, float)):
            typer.echo(f"{k:20s} {v:.3f}")
    if "tumour_cell_f1" in metrics:
        typer.echo(f"tumour cell P/R/F1   {metrics['tumour_cell_precision']:.3f} "
                   f"{metrics['tumour_cell_recall']:.3f} {metrics['tumour_cell_f1']:.3f}")
    if cells:
        froc_s = ", ".join(f"{int(k)}: {v:.2f}"
                           for k, v in metrics["froc_sensitivity_at_fp_per_mm2"].items())
        typer.echo(f"FROC sensitivity at FP/mm² {{{froc_s}}}")
    if json_out:
        write_json(json_out, {k: (v if not isinstance(v, dict) else {str(a): b for a, b in
                                                                       v.items()})
                              for k, v in metrics.items()})
    if calibrate:
        folder = resolve_model_dir(model)
        best = metrics["best_threshold"]
        new = card.model_copy(update={"heatmap": card.heatmap.model_copy(
            update={"threshold": best})})
        new.write(folder / "card.json")
        typer.echo(f"calibrated {folder / 'card.json'}: threshold {best:.2f}")


@app.command("model-hash")
def model_hash(
    model_dir: Annotated[Path, typer.Argument(metavar="DIR",
                                              help="Model folder (card.json + weights).")],
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a hash that does not match the weights.")] = False,
):
    """Write the sha256 of a model's weights into its card.json (a card must carry it)."""
    from tilscore.models.registry import write_card_sha256  # lazy: keeps `tilscore --help` fast

    card, done = write_card_sha256(model_dir, force=force)
    what = {"written": "wrote", "replaced": "replaced with",
            "unchanged": "already carries"}[done]
    typer.echo(f"{model_dir / 'card.json'}: {what} sha256 {card.sha256}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    *,
    size: Annotated[int | None, typer.Option(
        help="Side of the synthetic slide(s) in px.",
        show_default="4096; 1024 with --cohort")] = None,
    cohort: Annotated[bool, typer.Option(
        "--cohort", help="A small synthetic study instead: patients with H&E, CD20 and "
                         "FOXP3 slides and simulated survival, scored, with the study "
                         "statistics in the report.")] = False,
    patients: Annotated[int, typer.Option(min=3, max=200,
                                          help="Patients of --cohort.")] = 10,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
):
    """Generate a synthetic H&E slide and score it (the quick-start job); with --cohort a
    synthetic study, scored and reported."""
    # lazy: keeps `tilscore --help` fast
    from tilscore.batch import score_inputs
    from tilscore.synth.writer import write_synthetic_slide

    if cohort:
        from tilscore.synth_cohort import run_demo_cohort  # lazy: keeps `tilscore --help` fast

        path, made, result = run_demo_cohort(out, n_patients=patients, size_px=size or 1024,
                                             device=device)
        typer.echo(f"{made.n_patients} patients, {made.n_slides} slides "
                   f"({len(result.scored)} scored, {len(result.skipped)} already done, "
                   f"{len(result.failures)} failed); simulated HR {made.hr_per_sd:g} per SD "
                   f"of log CD20+ stromal density (truth: {made.truth})")
        typer.echo(f"report: {path}; tables: {out / 'samples.csv'}, "
                   f"{out / 'cohort_stats.csv'}")
        if result.failures:
            raise TilscoreError(result.failures[0]["error"])
        return
    size = size or 4096

    out.mkdir(parents=True, exist_ok=True)
    slide_path = out / "demo_slide.tiff"
    if not slide_path.exists():
        write_synthetic_slide(slide_path, stain="he", seed=0, size_px=(size, size), mpp=0.25)
    result = score_inputs([str(slide_path)], out, stain="he", device=device,
                          command=_state["command"])
    for row in result.rows:
        typer.echo(f"{row['slide']}: {_headline(row)}")
    typer.echo(f"outputs in {(out / 'demo_slide').resolve()}")
    if result.failures:
        raise TilscoreError(result.failures[0]["error"])


@app.command()
def report(
    out_dir: Annotated[Path, typer.Argument(metavar="DIR",
                                            help="Output folder of `tilscore score`.")],
    *,
    group_by: Annotated[str | None, typer.Option(
        help="Split distributions by this column (metadata or scores.csv).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="HTML file (default DIR/report.html).")] = None,
    survival: Annotated[str | None, typer.Option(
        metavar="TIME_COL,EVENT_COL",
        help="Survival analysis on these columns (manifest metadata, or --clinical).")] = None,
    clinical: Annotated[Path | None, typer.Option(
        help="CSV with the survival columns, joined on sample_id if it has one, else on "
             "patient_id.")] = None,
    level: Annotated[str, typer.Option(
        help="Unit of the statistics: patient (mean of its samples) or sample.")] = "patient",
    patient_column: Annotated[str, typer.Option(
        help="Manifest column naming a slide's patient.")] = "patient_id",
    sample_column: Annotated[str, typer.Option(
        help="Manifest column naming a slide's sample.")] = "sample_id",
):
    """Write a self-contained HTML report of a scored folder (table, plots, maps, study
    statistics) and rebuild its scores.csv and samples.csv from the slide summaries;
    the statistics also go to DIR/cohort_stats.csv."""
    # lazy: keeps `tilscore --help` fast
    from tilscore.report.cohort import write_report
    from tilscore.report.survival import StudyOptions
    from tilscore.results import write_scores
    from tilscore.samples import SampleColumns, write_samples

    cols = SampleColumns(patient_column, sample_column)
    study = StudyOptions.parse(survival, clinical=str(clinical) if clinical else None,
                               level=level, columns=cols)
    path = write_report(out_dir, group_by=group_by, path=out, study=study)
    write_scores(out_dir)
    write_samples(out_dir, cols)
    typer.echo(str(path))


def _headline(row: dict) -> str:
    """The end-of-run line of a slide (a scores.csv row): its stain's scores (H&E: sTIL %;
    IHC: % positive, positive cells per mm² of tissue, tumour and stroma, H-score), the
    tissue area, tiles and runtime; unknown (null) values are left out."""
    stain = row.get("stain") or "he"
    if stain == "he":
        scores = ("stromal_til_percent",)
    else:
        density = f"densities_per_mm2.{stain}_positive"
        scores = ("percent_positive", *(f"{density}.{c}" for c in ("tissue", "tumour", "stroma")),
                  "h_score")
    keys = (*scores, "areas_mm2.tissue", "qc.tiles", "runtime_s")
    parts = [f"{k}={row[k]:.3g}" for k in keys
             if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)]
    return ", ".join(parts)


def _interrupted_line(exc: Interrupted) -> str:
    """One line saying what a stopped run did and left."""
    result = exc.result
    if result is None:
        return f"interrupted by {exc.name}"
    return (f"interrupted by {exc.name}: no new slide started; {len(result.scored)} scored, "
            f"{len(result.skipped)} skipped, {len(result.failures)} failed before it; "
            "scores.csv, samples.csv and failures.csv written, work folders removed; "
            "rerun the same command to score the rest")


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    _state["command"] = " ".join(sys.argv if argv is None else [sys.argv[0], *argv])
    try:
        # With standalone_mode=False, click returns typer.Exit's code instead of raising.
        rc = app(args=argv, standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except TilscoreError as exc:
        if _state["debug"]:
            raise
        print(f"tilscore: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"tilscore: {_interrupted_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("tilscore: aborted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Usage errors from the (vendored) click inside typer: they print themselves.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return 2
        if _state["debug"]:
            raise
        print(f"tilscore: error: {type(exc).__name__}: {exc} (use --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
