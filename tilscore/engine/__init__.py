"""The model pass: the loaded engine and its defaults (`load`, `defaults`), batched
prediction with decoding on the device (`infer`), JPEG tiles decoded on the device
(`device_decode`), stitching into the region map and cell table (`stitch`), the fast
mode (`fast`)."""
