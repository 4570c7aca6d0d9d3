"""Expanding command-line inputs (files, folders, globs, CSV manifests) into slides with
unique ids."""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass, field
from pathlib import Path

from tilscore.errors import UsageError

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".png", ".jpg", ".jpeg", ".bmp",
)
STAINS = ("he", "cd20", "foxp3")
MANIFEST_COLUMNS = ("path", "slide_id", "stain", "mpp")  # `path` required; others optional
_SIDECAR_MARKERS = (".truth.",)  # files written beside synthetic slides
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputSlide:
    """One slide to score. `stain` and `mpp` (µm/px) are per-slide overrides from a
    manifest (None: the run's defaults); `metadata` holds the manifest's other columns,
    carried into the summary and scores.csv. `problem`: why this input cannot be scored
    (a manifest row's bad mpp or stain, a folder given as a slide): the batch records it
    as this input's failure and goes on with the others (None: none)."""

    path: Path
    slide_id: str
    stain: str | None = None
    mpp: float | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    problem: str | None = None


def slide_id_of(path: Path) -> str:
    """File name without its extension (``x.ome.tiff`` → ``x``)."""
    name = path.name
    for double in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return path.stem


def slide_id_problem(slide_id: str) -> str | None:
    """Why `slide_id` cannot name an output folder ``OUT/<slide_id>/`` (None: it can).

    An id must be one plain path component: not empty, no ``/``, ``\\``, NUL or control
    characters, not ``.``/``..`` and not starting with ``.`` (hidden, and the prefix of
    tilscore's own work folders). Anything else could put outputs outside ``--out``."""
    if not slide_id:
        return "is empty"
    bad = [c for c in slide_id if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if bad:
        return f"contains {bad[0]!r} (a slide id must be a single file name)"
    if slide_id.startswith("."):
        return "starts with '.' (hidden names and '.'/'..' are not allowed)"
    return None


def check_stain(stain: str) -> str:
    if stain not in STAINS:
        raise UsageError(f"unknown stain {stain!r}; valid: {', '.join(STAINS)}")
    return stain


def expand_inputs(inputs: list[str]) -> list[InputSlide]:
    """Files are taken as given (their errors surface when scored); folders contribute
    their slide/image files (sorted, non-recursive); globs their matches; ``*.csv`` files
    are manifests (`read_manifest`). Duplicate slide ids are a UsageError.

    Nothing named is dropped silently: a folder given explicitly that holds no slide
    file, and a folder named like a slide (``x.svs/``) given or found in a folder or
    glob, become inputs with a `problem` (each is a failure of the run, the others are
    scored); when nothing at all can be scored it is a UsageError."""
    slides: list[InputSlide] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            slides.extend(read_manifest(path))
        elif path.is_dir() and path.suffix.lower() in SLIDE_SUFFIXES:
            slides.append(_folder_problem(path, "is a folder, not a slide file"))
        elif path.is_dir():
            found = _slide_files(sorted(path.iterdir()))
            slides.extend(found or [_folder_problem(
                path, "is a folder with no slide or image file in it (folders are not "
                      f"searched recursively; slide files end in {', '.join(SLIDE_SUFFIXES)})")])
        elif not path.exists() and any(c in item for c in _GLOB_CHARS):
            matches = _slide_files(sorted(Path(p) for p in glob.glob(item, recursive=True)))
            if not matches:
                raise UsageError(f"no slides match {item!r}")
            slides.extend(matches)
        else:
            slides.append(_slide(path))
    if not slides or all(s.problem and s.slide_id == FOLDER_ID for s in slides):
        why = "; ".join(s.problem for s in slides)
        raise UsageError(f"no slides found in {', '.join(inputs)}" + (f" ({why})" if why else ""))
    _check_unique(slides)
    return slides


FOLDER_ID = ""  # the slide id of a folder that is not a slide (it names no output folder)


def _folder_problem(path: Path, why: str) -> InputSlide:
    return InputSlide(path, FOLDER_ID, problem=f"{path.name}: {why}")


def read_manifest(path: Path) -> list[InputSlide]:
    """Slides listed in a CSV manifest: column `path` (absolute, or relative to the
    manifest's folder) and optional `slide_id`, `stain`, `mpp`; every other column is
    pass-through metadata (patient id, sample type, block, ...)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"manifest {path}: cannot read it ({exc})") from exc
    if "path" not in columns:
        raise UsageError(f"manifest {path}: missing required column 'path' "
                         f"(columns: {', '.join(columns) or 'none'})")
    if len(set(columns)) != len(columns):
        raise UsageError(f"manifest {path}: repeated column names in the header")
    slides = []
    for line, raw in enumerate(rows, start=2):
        if None in raw:
            raise UsageError(f"manifest {path} line {line}: more values than columns")
        row = {k.strip(): (v or "").strip() for k, v in raw.items()}
        if not any(row.values()):
            continue  # blank line
        if not row["path"]:
            raise UsageError(f"manifest {path} line {line}: empty 'path'")
        slide_path = Path(row["path"]).expanduser()
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        slide_id = row.get("slide_id") or slide_id_of(slide_path)
        problem = slide_id_problem(slide_id)
        if problem:  # it would name the output folder: nothing runs
            raise UsageError(f"manifest {path} line {line}: slide_id {slide_id!r} {problem}")
        # A bad value of one row is that slide's failure, not the batch's.
        where = f"manifest {path} line {line}"
        stain, stain_problem = _manifest_stain(row.get("stain"), where)
        mpp, mpp_problem = _manifest_mpp(row.get("mpp"), where)
        slides.append(InputSlide(
            path=slide_path,
            slide_id=slide_id,
            stain=stain,
            mpp=mpp,
            metadata={k: v for k, v in row.items() if k not in MANIFEST_COLUMNS},
            problem=stain_problem or mpp_problem,
        ))
    if not slides:
        raise UsageError(f"manifest {path} lists no slides")
    return slides


def _manifest_stain(value: str | None, where: str) -> tuple[str | None, str | None]:
    """(stain or None, problem or None) of a manifest row's `stain` cell."""
    if not value:
        return None, None
    if value not in STAINS:
        return None, f"{where}: unknown stain {value!r}; valid: {', '.join(STAINS)}"
    return value, None


def _manifest_mpp(value: str | None, where: str) -> tuple[float | None, str | None]:
    """(µm/px or None, problem or None) of a manifest row's `mpp` cell: the range is the
    one every slide is opened with (:func:`tilscore.slide.base.mpp_problem`)."""
    # lazy: keeps `tilscore --help` fast (tilscore.slide imports numpy)
    from tilscore.slide.base import mpp_problem

    if not value:
        return None, None
    try:
        mpp = float(value)
    except ValueError:
        return None, f"{where}: mpp {value!r} is not a number (µm/px)"
    problem = mpp_problem(mpp)
    if problem:
        return None, f"{where}: mpp {value!r} {problem}"
    return mpp, None


def _slide_files(paths: list[Path]) -> list[InputSlide]:
    """The slide and image files among `paths` (a folder's entries or a glob's matches);
    a folder named like a slide (``x.svs/``) is kept as an input with a problem."""
    out = []
    for p in paths:
        if p.suffix.lower() not in SLIDE_SUFFIXES or any(m in p.name for m in _SIDECAR_MARKERS):
            continue
        if p.is_file():
            out.append(_slide(p))
        elif p.is_dir():
            out.append(_folder_problem(p, "is a folder, not a slide file"))
    return out


def _slide(path: Path) -> InputSlide:
    slide_id = slide_id_of(path)
    problem = slide_id_problem(slide_id)
    if problem:
        raise UsageError(f"{path}: its slide id {slide_id!r} {problem}; rename the file or "
                         "give it a slide_id in a CSV manifest")
    return InputSlide(path, slide_id)


def _check_unique(slides: list[InputSlide]) -> None:
    """The same file named twice is fine (scored once); two files with one id are not."""
    seen: dict[str, Path] = {}
    unique = []
    for s in slides:
        if s.slide_id == FOLDER_ID:
            if s.path not in {u.path for u in unique if u.slide_id == FOLDER_ID}:
                unique.append(s)
            continue
        if s.slide_id in seen:
            if seen[s.slide_id] != s.path:
                raise UsageError(f"duplicate slide id {s.slide_id!r}: {seen[s.slide_id]} and "
                                 f"{s.path} (give one a slide_id in a manifest, or rename it)")
            continue
        seen[s.slide_id] = s.path
        unique.append(s)
    slides[:] = unique
