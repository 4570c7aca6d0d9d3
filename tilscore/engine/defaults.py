"""The engine's defaults, in one place and without importing torch (the CLI's help reads
them at start-up): tiles per model batch per device type, and where JPEG tiles are
decoded (docs/benchmarks.md)."""

from __future__ import annotations

BATCH_SIZE = {"cpu": 8, "cuda": 32}  # tiles per model batch, by device type
DECODE_MODES = ("auto", "host", "device")
DEFAULT_DECODE = "auto"  # on the device with CUDA (where the slide allows it), else the host
