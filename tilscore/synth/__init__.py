"""Synthetic H&E and IHC slides with exact ground truth (tests, demo, benchmarks): the
scene layout and cells (`scene`), textures and painting (`paint`), the truth of a scene
(`truth`) and the pyramidal TIFF writer (`writer`)."""
