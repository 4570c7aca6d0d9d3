"""The architecture table (no imports: scripts in other environments read it by path).

name -> (segmentation-models-pytorch class name, default kwargs). Encoders start from
random weights: nothing is downloaded (``encoder_weights=None``).
"""

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "unet-resnet18": ("Unet", {"encoder_name": "resnet18",
                               "decoder_channels": (128, 64, 48, 32, 16)}),
    "unet-resnet34": ("Unet", {"encoder_name": "resnet34",
                               "decoder_channels": (256, 128, 64, 32, 16)}),
    "unet-mobilenetv3": ("Unet", {"encoder_name": "timm-mobilenetv3_small_100",
                                  "decoder_channels": (96, 64, 32, 24, 16)}),
    "unet-efficientnet-b0": ("Unet", {"encoder_name": "efficientnet-b0",
                                      "decoder_channels": (128, 64, 48, 32, 16)}),
    "fpn-resnet18": ("FPN", {"encoder_name": "resnet18"}),
}
