"""Expanding command-line inputs (files, folders) into slides with unique ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tilscore.errors import UsageError

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".png", ".jpg", ".jpeg", ".bmp",
)
_SIDECAR_MARKERS = (".truth.",)  # files written beside synthetic slides


@dataclass(frozen=True)
class InputSlide:
    path: Path
    slide_id: str


def slide_id_of(path: Path) -> str:
    """File name without its extension (``x.ome.tiff`` → ``x``)."""
    name = path.name
    for double in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return path.stem


def expand_inputs(inputs: list[str]) -> list[InputSlide]:
    """Files are taken as given (their errors surface when scored); folders contribute
    their slide/image files (sorted, non-recursive). Duplicate slide ids are a UsageError."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(
                p for p in sorted(path.iterdir())
                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                and not any(m in p.name for m in _SIDECAR_MARKERS)
            )
        else:
            found.append(path)
    if not found:
        raise UsageError(f"no slides found in {', '.join(inputs)}")
    slides = [InputSlide(p, slide_id_of(p)) for p in found]
    seen: dict[str, Path] = {}
    for s in slides:
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise UsageError(f"duplicate slide id {s.slide_id!r}: {seen[s.slide_id]} and {s.path}")
        seen[s.slide_id] = s.path
    return slides
