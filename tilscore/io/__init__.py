"""Output writers (JSON, CSV, GeoJSON, OME-Zarr, PNG). Every file is written atomically."""
