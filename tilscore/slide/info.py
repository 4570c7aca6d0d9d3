"""`tilscore info`: a JSON-ready description of a slide (no pixel decoding)."""

from __future__ import annotations

from pathlib import Path

from tilscore.errors import MissingMppError
from tilscore.slide import open_slide


def slide_info(path: str | Path, mpp: float | None = None) -> dict:
    """Vendor, dimensions, levels, mpp (None when unknown), objective power,
    associated images and file size of the slide at `path`."""
    path = Path(path)
    with open_slide(path, mpp=mpp) as slide:
        try:
            slide_mpp: float | None = slide.mpp
        except MissingMppError:
            slide_mpp = None
        power = slide.properties.get("openslide.objective-power")
        return {
            "path": str(path),
            "vendor": slide.vendor,
            "dimensions": list(slide.dimensions),
            "mpp": slide_mpp,
            "mpp_source": slide.mpp_source,
            "objective_power": float(power) if power else None,
            "levels": [
                {"width": w, "height": h, "downsample": round(ds, 4)}
                for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True)
            ],
            "associated_images": list(slide.associated_images),
            "file_size_bytes": path.stat().st_size if path.is_file() else None,
        }
