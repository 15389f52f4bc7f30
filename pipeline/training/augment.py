"""Training augmentation as the ReID field does it ("bag of tricks", Luo et al. 2019):
random horizontal flip, pad-and-random-crop, random erasing (Zhong et al. 2020).

Crops arrive already resized by :func:`pipeline.embed.resize_crop` and leave through
:func:`pipeline.embed.to_input_tensor`, so the model trains on exactly the pixels and the
normalisation it sees at inference; only the three augmentations come in between.
Randomness comes from a ``numpy.random.Generator`` the caller seeds, so a batch's
augmentation can be replayed (an exactly resumed run needs that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from reidx.pipeline.embed import to_input_tensor


@dataclass(frozen=True)
class Augment:
    """uint8 crops (N, H, W, 3) → augmented, normalised float32 (N, 3, H, W)."""

    flip_p: float = 0.5
    pad: int = 10  # zero padding before the random crop back to (H, W): shifts of up to ±pad px
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)  # fraction of the crop erased
    erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    # Erased pixels are set to 0 after normalisation, i.e. the ImageNet mean colour: an occluder
    # of "average" colour rather than noise the model could learn to spot.

    def __call__(self, crops: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        crops = np.asarray(crops, dtype=np.uint8)
        n, h, w, _ = crops.shape
        out = np.empty_like(crops)
        padded = np.pad(crops, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0))) if self.pad else crops
        flips = rng.random(n) < self.flip_p
        tops = rng.integers(0, 2 * self.pad + 1, size=n)
        lefts = rng.integers(0, 2 * self.pad + 1, size=n)
        for i in range(n):
            crop = padded[i, tops[i]:tops[i] + h, lefts[i]:lefts[i] + w]
            out[i] = crop[:, ::-1] if flips[i] else crop
        x = to_input_tensor(out)
        for i in np.flatnonzero(rng.random(n) < self.erase_p):
            box = self._erase_box(h, w, rng)
            if box is not None:
                top, left, eh, ew = box
                x[i, :, top:top + eh, left:left + ew] = 0.0
        return x

    def _erase_box(self, h: int, w: int, rng: np.random.Generator):
        """A random rectangle of the configured area and aspect that fits, or None after 100 tries."""
        for _ in range(100):
            area = rng.uniform(*self.erase_area) * h * w
            aspect = math.exp(rng.uniform(math.log(self.erase_aspect[0]), math.log(self.erase_aspect[1])))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                return int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)), eh, ew
        return None
