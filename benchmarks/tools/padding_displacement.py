"""How much zero padding of the input moves a backbone's stage maps over the image: the
relative change ||padded - alone|| / ||alone|| (Frobenius, the cells over the image) of stages
3 and 4, rsir_tiny against timm's swin_tiny_patch4_window7_224 (dynamic_img_size), both at
their random initialisation (seed 0), eval mode, fp32, a batch of 2 standard-normal images.

    python -m benchmarks.tools.padding_displacement [--large]

Cases: 256x256 padded to 256x320 (as a detection batch pads a smaller image beside a wider one);
232x300 padded to 256x320 (what a multiple-of-32 rule made a user do; sizes timm's Swin takes);
with --large, 800x1196 padded to 800x1216 (torchvision's size_divisible=32 at Mask R-CNN's scale;
a minute). RSIR's own padding (to a multiple of 4) moves nothing: it equals the stem's zero
border (tests/test_models.py).
"""
from __future__ import annotations

import argparse
import math

import torch


def displacement(model, nchw: bool, size, padded_size, seed=0) -> list[float]:
    """Stage 3 and 4 maps of images at `size`, against those of the same images zero-padded at
    the bottom and right to `padded_size`, cropped to ceil(size / stride)."""
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    padded = torch.nn.functional.pad(images, (0, padded_size[1] - size[1], 0, padded_size[0] - size[0]))
    with torch.no_grad():
        alone, inside = model(images), model(padded)
    out = []
    for stage, stride in ((2, 16), (3, 32)):
        a, b = alone[stage], inside[stage]
        if not nchw:  # timm's Swin: NHWC
            a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
        h, w = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        a, b = a[..., :h, :w], b[..., :h, :w]
        assert a.shape == b.shape, (a.shape, b.shape)
        out.append(((b - a).norm() / a.norm()).item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also 800x1196 -> 800x1216 (a minute)")
    args = parser.parse_args()
    import timm
    import rsir_kernels  # noqa: F401  registers rsir_tiny with timm

    torch.manual_seed(0)
    rsir = timm.create_model("rsir_tiny", features_only=True, backend="cpp").eval()
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, dynamic_img_size=True).eval()
    cases = [((256, 256), (256, 320)), ((232, 300), (256, 320))]
    if args.large:
        cases.append(((800, 1196), (800, 1216)))
    print("case                     stage 3 (RSIR / Swin)   stage 4 (RSIR / Swin)")
    for size, padded_size in cases:
        r = displacement(rsir, True, size, padded_size)
        s = displacement(swin, swin.output_fmt == "NCHW", size, padded_size)
        print(f"{size[0]}x{size[1]} -> {padded_size[0]}x{padded_size[1]}".ljust(25)
              + f"{r[0]:6.1%} / {s[0]:6.1%}".ljust(24) + f"{r[1]:6.1%} / {s[1]:6.1%}")


if __name__ == "__main__":
    main()
