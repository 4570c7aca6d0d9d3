"""Helpers shared by the slide backends: RGBA over white, µm/px from TIFF resolution
tags, one-line error texts."""

from __future__ import annotations

import numpy as np

# Lengths in one unit, in µm (OME PhysicalSizeXUnit and TIFF ResolutionUnit names).
UNIT_UM = {
    "m": 1e6, "cm": 1e4, "centimeter": 1e4, "mm": 1e3, "millimeter": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "pm": 1e-6, "å": 1e-4, "inch": 25400.0, "in": 25400.0,
}  # fmt: skip
# TIFF ResolutionUnit codes (2, 3 are baseline TIFF; 4, 5 are tifffile's extensions).
RESUNIT_NAMES = {1: "none", 2: "inch", 3: "centimeter", 4: "millimeter", 5: "micrometer"}


def composite_on_white(rgba: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """uint8 (H, W, 4) RGBA -> uint8 (H, W, 3) RGB over a white background.

    Straight alpha: ``(rgb*a + 255*(255-a)) / 255`` (rounded); premultiplied (TIFF
    associated alpha): ``rgb + 255 - a``.
    """
    alpha = rgba[..., 3:4]
    if bool((alpha == 255).all()):
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    a = alpha.astype(np.uint16)
    if premultiplied:
        out = np.minimum(rgb + (255 - a), 255)
    else:
        out = (rgb * a + 255 * (255 - a) + 127) // 255  # max 65152: fits uint16
    return out.astype(np.uint8)


def mpp_from_resolution(pixels_per_unit: float, unit: str | int | None) -> float | None:
    """µm/px from a TIFF X/YResolution value and its ResolutionUnit (name or code).

    Returns None for unit "none"/unknown or a non-positive resolution.
    """
    if isinstance(unit, int):
        unit = RESUNIT_NAMES.get(unit)
    um_per_unit = UNIT_UM.get(str(unit).strip().lower()) if unit is not None else None
    if um_per_unit is None or not pixels_per_unit or pixels_per_unit <= 0:
        return None
    return um_per_unit / float(pixels_per_unit)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
