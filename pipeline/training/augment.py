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


@dataclass(frozen=True)
class Photometric:
    """Strong photometric changes (uint8 crops → uint8 crops): brightness, contrast, saturation,
    grayscale and a loss of resolution — the ways another site's cameras differ. Used for the
    distillation view only (``distill_view="photometric"``): the student is held to the base's
    features on images unlike the training site's, where the new labels say nothing."""

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    saturation: tuple[float, float] = (0.3, 1.7)
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_scale: tuple[float, float] = (0.25, 0.75)  # down-sampled to this fraction, then back up

    def __call__(self, crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        x = np.asarray(crops, dtype=np.float32)
        n, h, w, _ = x.shape
        gray = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
        saturation = rng.uniform(*self.saturation, size=(n, 1, 1, 1)).astype(np.float32)
        saturation[rng.random(n) < self.gray_p] = 0.0
        x = gray + saturation * (x - gray)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + rng.uniform(*self.contrast, size=(n, 1, 1, 1)).astype(np.float32) * (x - mean)
        x = x * rng.uniform(*self.brightness, size=(n, 1, 1, 1)).astype(np.float32)
        out = np.clip(x, 0, 255).astype(np.uint8)
        scales = rng.uniform(*self.blur_scale, size=n)
        for i in np.flatnonzero(rng.random(n) < self.blur_p):
            small = Image.fromarray(out[i]).resize((max(1, round(w * scales[i])), max(1, round(h * scales[i]))),
                                                  Image.BILINEAR)
            out[i] = np.asarray(small.resize((w, h), Image.BILINEAR))
        return out
