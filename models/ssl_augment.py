"""Band-aware view augmentation for self-distillation, batched on the device (RGB or 13 bands).

Every operation treats channels alike (no grayscale, hue or solarisation, which only mean
something for RGB): a random resized crop with flips (one affine resampling per sample), a
random gain smooth over the band order (illumination and atmosphere), per-band brightness and
contrast jitter in the data's scaled units, and Gaussian blur. They run on normalised
(B, C, H, W) batches after the datamodule, with no per-sample Python work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _uniform(
    shape: tuple[int, ...], low: float, high: float, like: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=like.device, generator=gen)


def crop_boxes(
    batch: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    like: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop boxes as fractions of the image: (B, 4) rows ``(cx, cy, w, h)`` in [0, 1].

    Area fraction uniform in ``scale``, log aspect ratio (w / h) uniform in ``log(ratio)``;
    a side longer than the image is clipped to it (no retries), the centre is uniform over the
    positions that keep the box inside.
    """
    area = _uniform((batch,), *scale, like, generator)
    log_r = _uniform((batch,), math.log(ratio[0]), math.log(ratio[1]), like, generator)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(batch, device=like.device, generator=generator)
    cy = h / 2 + (1 - h) * torch.rand(batch, device=like.device, generator=generator)
    return torch.stack([cx, cy, w, h], dim=1)


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop every image to its box and resize it to ``size`` (bilinear), flipping on request.

    Args:
        images: (B, C, H, W).
        boxes: (B, 4) ``(cx, cy, w, h)`` fractions (:func:`crop_boxes`).
        size: Output side.
        flip: (B, 2) bool, horizontal and vertical flip per image; None: none.

    Returns:
        (B, C, size, size).
    """
    b = images.shape[0]
    cx, cy, w, h = boxes.to(images.dtype).unbind(1)
    sx, sy = w, h
    if flip is not None:
        sx = torch.where(flip[:, 0], -sx, sx)
        sy = torch.where(flip[:, 1], -sy, sy)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = sy, 2 * cy - 1
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def smooth_gain(
    batch: int,
    channels: int,
    ranges: tuple[float, float, float],
    like: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, C) gains smooth over the band order: ``exp(a + b z + c (z^2 - 1/3))``.

    ``z`` is the band's position mapped to [-1, 1] (Sentinel-2's band order is its wavelength
    order); ``a, b, c`` are uniform in ``+-ranges`` per sample: the level, tilt and curvature of
    a log gain, as illumination, aerosol and water-vapour transmission change a spectrum.
    """
    z = torch.linspace(-1, 1, channels, device=like.device) if channels > 1 else like.new_zeros(1)
    a, b, c = (_uniform((batch, 1), -r, r, like, generator) for r in ranges)
    return (a + b * z + c * (z**2 - 1 / 3)).exp()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel (reflect padding); (B, C, H, W) -> same."""
    radius = max(1, min(math.ceil(3 * sigma), (min(images.shape[-2:]) - 1) // 2))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class BandAugment:
    """One random view of a normalised batch: resized crop + flips, band gains, blur.

    Gains act in the data's scaled units (``x * std + mean`` of the
    normalisation, i.e. reflectance for Sentinel-2 or [0, 1] for RGB), with one factor per
    band and sample: brightness ``x * b``, contrast ``mu + (x - mu) * c`` around the band's
    spatial mean ``mu``; ``b, c`` uniform in ``[1 - strength, 1 + strength]``, applied to a
    sample with probability ``jitter_prob`` (SSL4EO-S12: 0.4, 0.4, p 0.8). With
    ``spectral_gain`` every view is first multiplied by its own gain smooth over the band order
    (:func:`smooth_gain`): independent per-band factors average out over 13 bands, so two views
    of a tile would still share its illumination and atmosphere (a colour shortcut for
    instance discrimination); a smooth per-view gain of the size the scenes vary by removes it
    and keeps what a smooth gain cannot change, the sharp spectral features (red edge, water
    absorption) and the texture.

    Args:
        size: Output side in pixels.
        scale: Area range of the crop (fractions of the image).
        ratio: Aspect ratio range of the crop.
        flip: Random horizontal and vertical flips (overhead imagery has no up).
        brightness: Brightness jitter strength (0: off).
        contrast: Contrast jitter strength (0: off).
        jitter_prob: Probability that a sample is jittered.
        spectral_gain: Ranges (+-) of the smooth log gain's level, tilt and curvature
            (:func:`smooth_gain`); zeros: off.
        blur_prob: Probability that a sample is blurred.
        blur_sigma: Range of the blur's sigma in output pixels (one draw per batch).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        brightness: float = 0.4,
        contrast: float = 0.4,
        jitter_prob: float = 0.8,
        spectral_gain: tuple[float, float, float] = (0.0, 0.0, 0.0),
        blur_prob: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if size < 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"bad crop settings: size={size}, scale={scale}, ratio={ratio}")
        if not (0 <= jitter_prob <= 1 and 0 <= blur_prob <= 1):
            raise ValueError(f"probabilities must be in [0, 1]: {jitter_prob}, {blur_prob}")
        if not (0 <= brightness < 1 and 0 <= contrast < 1):
            raise ValueError(f"jitter strengths must be in [0, 1): {brightness}, {contrast}")
        if len(spectral_gain) != 3 or min(spectral_gain) < 0:
            raise ValueError(
                f"spectral_gain must be 3 ranges >= 0 (level, tilt, curve), got {spectral_gain}"
            )
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.brightness, self.contrast, self.jitter_prob = brightness, contrast, jitter_prob
        self.blur_prob, self.blur_sigma = blur_prob, tuple(blur_sigma)
        self.spectral_gain = tuple(float(r) for r in spectral_gain)

    def jitter(
        self,
        images: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Smooth band gain, per-band brightness and contrast of normalised (B, C, H, W) images.

        See the class doc; the smooth gain applies to every image, the jitter with
        ``jitter_prob``.

        Args:
            images: Normalised images.
            mean, std: (C,) the normalisation's mean and std (scaled units).
            generator: Optional RNG on the images' device.
        """
        b, c = images.shape[:2]
        m, s = mean.view(1, c, 1, 1), std.view(1, c, 1, 1)
        x = images * s + m
        if any(self.spectral_gain):
            x = x * smooth_gain(b, c, self.spectral_gain, x, generator).view(b, c, 1, 1)
        on = torch.rand(b, 1, 1, 1, device=images.device, generator=generator) < self.jitter_prob
        bright = _uniform((b, c, 1, 1), 1 - self.brightness, 1 + self.brightness, x, generator)
        contrast = _uniform((b, c, 1, 1), 1 - self.contrast, 1 + self.contrast, x, generator)
        y = x * bright
        mu = y.mean(dim=(2, 3), keepdim=True)
        y = mu + (y - mu) * contrast
        return (torch.where(on, y, x) - m) / s

    def __call__(
        self,
        images: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A random view of every image.

        Args:
            images: (B, C, H, W) normalised images.
            mean, std: The normalisation's per-channel mean and std (scaled units).
            generator: Optional RNG on the images' device.

        Returns:
            (B, C, size, size) normalised views.
        """
        b = images.shape[0]
        boxes = crop_boxes(b, self.scale, self.ratio, images, generator)
        flip = None
        if self.flip:
            flip = torch.rand(b, 2, device=images.device, generator=generator) < 0.5
        x = resized_crop(images, boxes, self.size, flip)
        if self.brightness or self.contrast or any(self.spectral_gain):
            m, s = (torch.tensor(v, device=x.device, dtype=x.dtype) for v in (mean, std))
            x = self.jitter(x, m, s, generator)
        if self.blur_prob > 0:
            sigma = float(_uniform((1,), *self.blur_sigma, x, generator))
            on = torch.rand(b, 1, 1, 1, device=x.device, generator=generator) < self.blur_prob
            x = torch.where(on, gaussian_blur(x, sigma), x)
        return x


__all__ = ["BandAugment", "crop_boxes", "gaussian_blur", "resized_crop", "smooth_gain"]
