"""In-memory backend over a numpy array (tests, synthetic slides, already-loaded ROIs)."""

from __future__ import annotations

import numpy as np

from tilscore.errors import UsageError


class ArrayBackend:
    """One level over a uint8 (H, W, 3) RGB array, kept by reference (no copy).

    ``metadata_mpp`` is None: the pixel size is given to :func:`open_slide` as ``mpp``.
    """

    vendor = "array"
    metadata_mpp = None

    def __init__(self, array: np.ndarray):
        if not isinstance(array, np.ndarray):
            raise UsageError(f"expected a numpy array, got {type(array).__name__}")
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise UsageError(
                f"array slide must be uint8 (H, W, 3) RGB, got {array.dtype} {array.shape}"
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise UsageError(f"array slide is empty: shape {array.shape}")
        self._array = array
        self.level_dimensions = ((int(array.shape[1]), int(array.shape[0])),)
        self.properties = {"tilscore.associated_images": ""}

    def read_level(self, level: int, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) copy of array[y:y+height, x:x+width]."""
        return self._array[y : y + height, x : x + width].copy()

    def close(self) -> None:
        pass
