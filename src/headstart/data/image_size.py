"""`--image-size auto`: the crop size of a run, by a rule relative to the backbone's own input size.

Images at least a quarter of the backbone's size run at the backbone's size. Much smaller
images are upsampled, by how much depending on the strategy, since they pay differently:
- feature extraction pays for pixels once (one pass per image) and its linear probe keeps
  gaining up to about 0.7x the backbone's size (FE_SHARE: 160 px for MobileNetV2's 224);
- fine-tuning pays for them in every epoch (the default FMNIST-TL run must stay within 15
  minutes), so it upsamples at most MAX_UPSAMPLE times, rounded up to a multiple of 32
  (28 px -> 128 px), at least 64;
- `--strategy auto` sizes before phase 1: as feature extraction when auto's choice is already
  known to be feature extraction (a class under auto.MIN_PER_CLASS training images), else as
  fine-tuning; scratch keeps the fine-tuning rule, which is the small CNN's native 32 px.
The measurements behind FE_SHARE (RULE, recorded in config.json as `image_size_rule`; docs/guides/data.md,
"Choosing the image size"): MobileNetV2 features, linear head, test accuracy by size:
FMNIST-TL (28 px) 0.8720 at 128, 0.8772 at 160, 0.8809 at 224 (160 px extracts at about twice
224's rate); digits (8 px, mean of 5 seeds) 0.9767 at 160 px, 0.9761 at 224. Validation (180 images on digits) ranked
the sizes wrongly on 2 of 5 seeds, so a rule replaced a per-run search.
"""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image

from headstart.quiet import quiet

MAX_UPSAMPLE = 4
FE_SHARE = 0.7

RULE = {
    "rule": f"images under a quarter of the backbone's size: feature extraction at about {FE_SHARE}x the "
            f"backbone's size (a multiple of 32), fine-tuning and scratch upsampled at most {MAX_UPSAMPLE}x "
            "(a multiple of 32, at least 64); otherwise the backbone's size",
    "measured": "MobileNetV2 features, linear head, test accuracy by image size: FMNIST-TL (28 px) 128 px 0.8720, "
                "160 px 0.8772, 224 px 0.8809; digits (8 px, mean of 5 seeds) 32 px 0.9317, 160 px 0.9767, "
                "224 px 0.9761; docs/guides/data.md, 'Choosing the image size' (benchmarks/image_size.py)",
}


def median_side(data, sample: int = 64) -> float | None:
    """The median shorter side of up to `sample` images spread over the data set; None if none could be read."""
    paths = [s.path for s in data.samples[:: max(1, len(data.samples) // sample)]][:sample]
    sides = []
    for p in paths:
        if not os.path.isfile(p):  # opening a FIFO named like an image would wait forever
            continue
        try:
            with quiet(), PIL.Image.open(p) as im:  # a header's oddities are load_image's to report
                sides.append(min(im.size))
        except Exception:
            continue
    return float(np.median(sides)) if sides else None


def _multiple_of_32(x: float) -> int:
    return int(math.ceil(x / 32) * 32)


def size_for(side: float, default: int, strategy: str) -> int:
    """The crop size for images of shorter side `side` under a backbone of input size `default`."""
    upsampled = min(default, max(64, _multiple_of_32(side * MAX_UPSAMPLE)))
    if strategy == "feature-extraction":
        return max(upsampled, min(default, _multiple_of_32(FE_SHARE * default)))
    return upsampled


def image_size_for(data, default: int, rule_of: str, why: str, sample: int = 64) -> tuple[int, str]:
    """The crop size for this data under the size rule `rule_of` ("feature-extraction" or "fine-tune"; a
    strategy says which, and `why`), and the reason: the backbone's own unless the images are much smaller."""
    side = median_side(data, sample)
    if side is None:
        return default, f"backbone default {default} px (image sizes unknown)"
    size = size_for(side, default, rule_of)
    if size == default:
        return size, f"backbone default {default} px (median image side {side:.0f} px)"
    if rule_of == "feature-extraction":
        how = f"feature extraction upsamples to about {FE_SHARE}x the backbone's {default} px"
    else:
        how = f"fine-tuning upsamples at most {MAX_UPSAMPLE}x"
    return size, f"{size} px: median image side {side:.0f} px; {why}: {how}"
