"""Plain-image backend (PNG, JPEG, BMP, GIF, WebP, single-page TIFF ...) via Pillow.

The whole image is decoded into memory at open: width x height x 3 bytes (a 20000 x 20000
image takes 1.2 GB). That suits plain images (ROIs, crops, tiles); whole slides should be
pyramidal TIFF or a vendor format. So a plain image may have at most Pillow's
decompression-bomb limit of pixels (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpx = 268 MB
decoded), checked from the header before anything is decoded: above it the open fails
with one line (a SlideOpenError) instead of Pillow's raw DecompressionBombWarning (up to
twice the limit, after which Pillow decoded it anyway) or its error.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tilscore.errors import NotBrightfieldError, SlideOpenError
from tilscore.slide.common import composite_on_white, mpp_from_resolution, one_line

log = logging.getLogger(__name__)

# Pillow modes that hold colour we can turn into RGB (alpha ones composited on white).
_COLOUR_MODES = {"RGB", "CMYK", "YCbCr", "LAB", "HSV", "P", "RGBX"}
_ALPHA_MODES = {"RGBA", "RGBa", "PA"}
_MODE_WORDS = {
    "1": "1-bit black-and-white",
    "L": "8-bit greyscale",
    "LA": "8-bit greyscale with alpha",
    "La": "8-bit greyscale with alpha",
    "I": "32-bit integer",
    "F": "32-bit float",
}


def is_pillow_image(path: str | Path) -> bool:
    """True when Pillow recognises the file's format (reads the header only)."""
    try:
        with _no_bomb_warning(), Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image all the same; ImageBackend reports the limit
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    except Exception:  # a plugin choking on foreign bytes: not an image for us
        log.debug("Pillow failed to identify %s", path, exc_info=True)
        return False


class ImageBackend:
    """A plain image decoded whole with Pillow: one level, uint8 RGB in memory.

    ``metadata_mpp`` is None (plain images need --mpp), except for TIFF files carrying
    X/YResolution with a centimetre/inch ResolutionUnit. ``vendor`` is "image".
    """

    vendor = "image"

    def __init__(self, path: str | Path):
        self._path = Path(path)
        name = self._path.name
        try:
            with _no_bomb_warning(), Image.open(self._path) as image:
                _check_size(image.size, name)
                if getattr(image, "n_frames", 1) > 1:
                    log.warning("%s: %d frames; using the first", name, image.n_frames)
                fmt = image.format or "unknown"
                mode = image.mode
                self.metadata_mpp = _tiff_mpp(image) if fmt == "TIFF" else None
                self._pixels = _to_rgb(image, name)
        except Image.DecompressionBombError as exc:  # Pillow's own check: beyond 2x
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise SlideOpenError(_too_large(
                name, f"{int(pixels[1]):,} pixels" if pixels else "its size")) from exc
        except (NotBrightfieldError, SlideOpenError):
            raise
        except UnidentifiedImageError as exc:
            raise SlideOpenError(f"{name}: not an image Pillow can read") from exc
        except Exception as exc:  # truncated or corrupt data, unsupported codec
            raise SlideOpenError(f"{name}: cannot decode the image ({one_line(exc)})") from exc
        height, width = self._pixels.shape[:2]
        self.level_dimensions = ((width, height),)
        self.properties = {
            "tilscore.format": fmt,
            "tilscore.mode": mode,
            "tilscore.associated_images": "",
        }

    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) copy of the in-memory image at pixel (x, y)."""
        return self._pixels[y : y + height, x : x + width].copy()

    def close(self) -> None:
        self._pixels = np.zeros((0, 0, 3), np.uint8)


@contextlib.contextmanager
def _no_bomb_warning():
    """Pillow's DecompressionBombWarning silenced: :func:`_check_size` says it in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _check_size(size: tuple[int, int], name: str) -> None:
    """SlideOpenError when a plain image of `size` (w, h) would exceed the pixel limit."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise SlideOpenError(_too_large(name, f"{size[0]} x {size[1]} px"))


def _too_large(name: str, what: str) -> str:
    return (f"{name}: plain image too large ({what}; at most {Image.MAX_IMAGE_PIXELS:,} "
            "pixels, since it is decoded whole into memory: a decompression-bomb guard); "
            "convert it to a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tiff --tile "
            "--pyramid --compression jpeg)")


def _to_rgb(image, name: str) -> np.ndarray:
    """Decode a Pillow image to uint8 (H, W, 3); NotBrightfieldError for non-colour modes."""
    mode = image.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return composite_on_white(np.asarray(image.convert("RGBA")))
    if mode in _COLOUR_MODES:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    what = _MODE_WORDS.get(mode, "16-bit" if mode.startswith("I;16") else f"mode {mode}")
    raise NotBrightfieldError(
        f"{name}: {what} image (Pillow mode {mode}); tilscore reads 8-bit RGB brightfield only"
    )


def _tiff_mpp(image) -> float | None:
    """µm/px from a TIFF's X/YResolution + ResolutionUnit tags, or None."""
    tags = getattr(image, "tag_v2", {})
    try:
        unit = int(tags.get(296, 2))  # TIFF default unit: inch
        mpps = [mpp_from_resolution(float(tags[code]), unit) for code in (282, 283)]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if None in mpps:
        return None
    return (mpps[0] + mpps[1]) / 2.0
