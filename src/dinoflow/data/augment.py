"""DINOv2 multi-crop augmentation as batched tensor ops (CPU or GPU, no PIL per image).

Per global crop: random resized crop (scale 0.32-1.0, DINOv2), horizontal flip (p 0.5), colour
jitter (p 0.8: brightness 0.4, contrast 0.4, saturation 0.2 on RGB), grayscale (p 0.2, RGB only),
Gaussian blur (p 1.0 on crop 1, 0.1 on crop 2, 0.5 on local crops), solarize (p 0.2 on crop 2) —
the official recipe. Local crops: scale 0.05-0.32. Blur sigma is 0.1-2.0 px at 224 px (official)
and scales with the crop size, so 28 px grayscale images are blurred proportionally.

Every random choice is drawn for the WHOLE global batch from one generator shared by all ranks and
then sliced, so a sample's crops do not depend on how the batch is split over processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinoflow.data.stream import CropGroup


@dataclass(frozen=True)
class MultiCropConfig:
    global_crops_number: int = 2
    global_crop_px: int = 224  # DINOv2 default
    global_scale: tuple[float, float] = (0.32, 1.0)  # DINOv2 default
    local_crops_number: int = 8  # DINOv2 default
    local_crop_px: int = 98  # DINOv2: 96 (98 for /14 models)
    local_scale: tuple[float, float] = (0.05, 0.32)  # DINOv2 default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    blur_sigma_at_224: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # global crop 2 only


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def crop_boxes(
    g: torch.Generator, n: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """``[n, 4]`` boxes (cx, cy, w, h) in units of the image side, inside the image."""
    area = _uniform(g, n, *scale)
    log_r = _uniform(g, n, math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(n, generator=g)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=g)
    return torch.stack([cx, cy, w, h], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_px: int) -> torch.Tensor:
    """Bilinear crop+resize of float ``[B, C, H, W]`` by per-sample boxes with an affine grid."""
    b = images.shape[0]
    boxes = boxes.to(images.device, images.dtype)
    sx = boxes[:, 2] * torch.where(flip.to(images.device), -1.0, 1.0).to(images.dtype)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = boxes[:, 0] * 2 - 1
    theta[:, 1, 1] = boxes[:, 3]
    theta[:, 1, 2] = boxes[:, 1] * 2 - 1
    grid = F.affine_grid(theta, [b, images.shape[1], out_px, out_px], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def color_jitter(
    x: torch.Tensor, g: torch.Generator, cfg: MultiCropConfig, n_global: int, sl: slice
) -> torch.Tensor:
    """Brightness, contrast (and saturation on RGB), applied with probability ``jitter_p``."""
    dev, dt = x.device, x.dtype
    on = (torch.rand(n_global, generator=g) < cfg.jitter_p)[sl].to(dev)
    bri = _uniform(g, n_global, 1 - cfg.brightness, 1 + cfg.brightness)[sl].to(dev, dt).view(-1, 1, 1, 1)
    con = _uniform(g, n_global, 1 - cfg.contrast, 1 + cfg.contrast)[sl].to(dev, dt).view(-1, 1, 1, 1)
    sat = _uniform(g, n_global, 1 - cfg.saturation, 1 + cfg.saturation)[sl].to(dev, dt).view(-1, 1, 1, 1)
    y = (x * bri).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * con + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gy = _gray(y)
        y = ((y - gy) * sat + gy).clamp(0, 1)
    return torch.where(on.view(-1, 1, 1, 1), y, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Separable blur with a per-sample sigma (grouped conv); samples with ``on`` False pass through."""
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.device, x.dtype).view(-1, 1)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sig**2))
    k = k / k.sum(dim=1, keepdim=True)  # [b, K]
    k = k.repeat_interleave(c, dim=0)  # [b*c, K]
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)
    return torch.where(on.to(x.device).view(-1, 1, 1, 1), y, x)


class MultiCrop:
    """uint8 ``[b, C, H, W]`` -> normalised float global crops ``[G*b, C, g, g]`` and local crops
    ``[L*b, C, l, l]``, crop-major (all samples of crop 0, then crop 1, ...)."""

    def __init__(self, cfg: MultiCropConfig, mean: tuple[float, ...], std: tuple[float, ...]):
        self.cfg = cfg
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def _one(
        self, x: torch.Tensor, g: torch.Generator, n: int, sl: slice, px: int, scale, blur_p, sol_p
    ) -> torch.Tensor:
        cfg = self.cfg
        boxes = crop_boxes(g, n, scale, cfg.ratio)[sl]
        flip = (torch.rand(n, generator=g) < cfg.flip_p)[sl]
        return self._photometric(resized_crop(x, boxes, flip, px), g, n, sl, px, blur_p, sol_p)

    def _photometric(
        self, y: torch.Tensor, g: torch.Generator, n: int, sl: slice, px: int, blur_p, sol_p
    ) -> torch.Tensor:
        cfg = self.cfg
        x = y
        y = color_jitter(y, g, cfg, n, sl)
        gray_on = (torch.rand(n, generator=g) < cfg.grayscale_p)[sl].to(x.device)
        if y.shape[1] == 3:
            y = torch.where(gray_on.view(-1, 1, 1, 1), _gray(y).expand_as(y), y)
        s_lo, s_hi = (s * px / 224 for s in cfg.blur_sigma_at_224)
        sigma = _uniform(g, n, s_lo, s_hi)[sl]
        blur_on = (torch.rand(n, generator=g) < blur_p)[sl]
        if blur_on.any():
            y = gaussian_blur(y, sigma, blur_on)
        sol_on = (torch.rand(n, generator=g) < sol_p)[sl].to(x.device)
        y = torch.where(sol_on.view(-1, 1, 1, 1) & (y >= 0.5), 1 - y, y)  # solarize at 128/255
        return (y - self.mean.to(y.device)) / self.std.to(y.device)

    def groups(self) -> list[CropGroup]:
        """The geometric crops a data worker cuts from each original image (``crop_image``)."""
        cfg = self.cfg
        out = [
            CropGroup(cfg.global_crops_number, cfg.global_crop_px, cfg.global_scale, cfg.ratio, cfg.flip_p)
        ]
        if cfg.local_crops_number:
            out.append(
                CropGroup(cfg.local_crops_number, cfg.local_crop_px, cfg.local_scale, cfg.ratio, cfg.flip_p)
            )
        return out

    def photometric(
        self, crops: list[torch.Tensor], g: torch.Generator, offset: int = 0, global_batch: int | None = None
    ):
        """Crops already cut per image by the data workers (uint8 ``[n, b, C, px, px]`` per group of
        ``groups()``) -> normalised float global and local crops, as ``__call__`` returns them; the
        photometric draws are made for the whole global batch and sliced, as there."""
        cfg = self.cfg
        b = crops[0].shape[1]
        n = global_batch or b
        sl = slice(offset, offset + b)
        blur_g = [cfg.blur_p[0], cfg.blur_p[1]] + [cfg.blur_p[1]] * max(0, cfg.global_crops_number - 2)
        sol_g = [0.0, cfg.solarize_p] + [cfg.solarize_p] * max(0, cfg.global_crops_number - 2)
        glob = [
            self._photometric(crops[0][i].float() / 255.0, g, n, sl, cfg.global_crop_px, blur_g[i], sol_g[i])
            for i in range(cfg.global_crops_number)
        ]
        loc = [
            self._photometric(crops[1][i].float() / 255.0, g, n, sl, cfg.local_crop_px, cfg.blur_p[2], 0.0)
            for i in range(cfg.local_crops_number)
        ]
        return torch.cat(glob), (torch.cat(loc) if loc else None)

    def __call__(
        self, images: torch.Tensor, g: torch.Generator, offset: int = 0, global_batch: int | None = None
    ):
        cfg = self.cfg
        b = images.shape[0]
        n = global_batch or b
        sl = slice(offset, offset + b)
        x = images.float() / 255.0
        blur_g = [cfg.blur_p[0], cfg.blur_p[1]] + [cfg.blur_p[1]] * max(0, cfg.global_crops_number - 2)
        sol_g = [0.0, cfg.solarize_p] + [cfg.solarize_p] * max(0, cfg.global_crops_number - 2)
        glob = [
            self._one(x, g, n, sl, cfg.global_crop_px, cfg.global_scale, blur_g[i], sol_g[i])
            for i in range(cfg.global_crops_number)
        ]
        loc = [
            self._one(x, g, n, sl, cfg.local_crop_px, cfg.local_scale, cfg.blur_p[2], 0.0)
            for _ in range(cfg.local_crops_number)
        ]
        return torch.cat(glob), (torch.cat(loc) if loc else None)
