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
    carried into the summary and scores.csv."""

    path: Path
    slide_id: str
    stain: str | None = None
    mpp: float | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)


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
    are manifests (`read_manifest`). Duplicate slide ids are a UsageError."""
    slides: list[InputSlide] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            slides.extend(read_manifest(path))
        elif path.is_dir():
            slides.extend(_slide(p) for p in _slide_files(sorted(path.iterdir())))
        elif not path.exists() and any(c in item for c in _GLOB_CHARS):
            matches = _slide_files(sorted(Path(p) for p in glob.glob(item, recursive=True)))
            if not matches:
                raise UsageError(f"no slides match {item!r}")
            slides.extend(_slide(p) for p in matches)
        else:
            slides.append(_slide(path))
    if not slides:
        raise UsageError(f"no slides found in {', '.join(inputs)}")
    _check_unique(slides)
    return slides


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
        stain = row.get("stain") or None
        if stain is not None and stain not in STAINS:
            raise UsageError(f"manifest {path} line {line}: unknown stain {stain!r}; "
                             f"valid: {', '.join(STAINS)}")
        slide_id = row.get("slide_id") or slide_id_of(slide_path)
        problem = slide_id_problem(slide_id)
        if problem:
            raise UsageError(f"manifest {path} line {line}: slide_id {slide_id!r} {problem}")
        slides.append(InputSlide(
            path=slide_path,
            slide_id=slide_id,
            stain=stain,
            mpp=_manifest_mpp(row.get("mpp"), path, line),
            metadata={k: v for k, v in row.items() if k not in MANIFEST_COLUMNS},
        ))
    if not slides:
        raise UsageError(f"manifest {path} lists no slides")
    return slides


def _manifest_mpp(value: str | None, path: Path, line: int) -> float | None:
    if not value:
        return None
    try:
        mpp = float(value)
    except ValueError:
        mpp = float("nan")
    if not 0.01 <= mpp <= 100:  # also rejects nan
        raise UsageError(f"manifest {path} line {line}: mpp {value!r} is not a plausible "
                         "µm/px (0.01–100)")
    return mpp


def _slide_files(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            and not any(m in p.name for m in _SIDECAR_MARKERS)]


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
        if s.slide_id in seen:
            if seen[s.slide_id] != s.path:
                raise UsageError(f"duplicate slide id {s.slide_id!r}: {seen[s.slide_id]} and "
                                 f"{s.path} (give one a slide_id in a manifest, or rename it)")
            continue
        seen[s.slide_id] = s.path
        unique.append(s)
    slides[:] = unique
