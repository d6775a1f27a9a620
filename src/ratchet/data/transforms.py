"""Batch transforms applied by the loader on the training device: augmentation and normalisation.

Image batches arrive as uint8 `(N, C, H, W)` tensors (on the GPU when there is one). The
training transform converts to [0, 1] floats, augments, then normalises with the training
split's per-channel mean and std; the evaluation transform only converts and normalises, so
there is no augmentation at evaluation.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a batch
they would flip, rotate or shear every image in it the same way. `BatchAugment` draws the
parameters per image from its own generator, seeded by (seed, epoch, rank), and applies them to
the whole batch at once: flips with `torchvision.transforms.v2.functional`; autocontrast (as
torchvision computes it), noise and normalisation as tensor ops; rotation/shear/scale/translation
as one batched affine resampling (`affine_grid` + `grid_sample`). The same seed gives the same
augmented batches, independent of the global RNG, so a resumed run sees what an uninterrupted
one would.

Nothing here waits for the device: no host-to-device copies per batch (the normalisation
statistics are kept on the device), no `linalg.inv` (its error check reads the result back: the
2x2 inverses are written out), no boolean-mask indexing (`torch.where` instead). On a GPU each of
those would stall the queue of kernels once per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as TF

from ratchet.config import AugmentConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


class ToUnitFloat:
    """uint8 pixels -> float32 in [0, 1]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return TF.to_dtype(x, torch.float32, scale=True)


class Normalize:
    """(x - mean) / std per channel, with the training split's statistics; the result is laid
    out channels-last, the layout convolutions run fastest in (the network is converted too)."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = list(mean), list(std)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # on the batches' device, made once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._stats is None or self._stats[0].device != x.device or self._stats[0].dtype != x.dtype:
            self._stats = tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1)
                                for v in (self.mean, self.std))
        mean, std = self._stats
        # Normalised first, then laid out: broadcasting over channels-last is 3x slower on CPU.
        return x.sub(mean).div_(std).contiguous(memory_format=torch.channels_last)


class BatchAugment:
    """Random flips, affine changes, autocontrast and noise, drawn per image; see the module doc."""

    def __init__(self, cfg: AugmentConfig, seed: int, device: torch.device | str = "cpu"):
        self.cfg, self.seed = cfg, seed
        self.generator = torch.Generator(device=device)
        self.set_epoch(0)

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(c.hflip or c.rotation or c.shear or c.translate or c.autocontrast or c.noise
                    or tuple(c.scale) != (1.0, 1.0))

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Reseed: each (seed, epoch, rank) has its own stream of random parameters."""
        self.generator.manual_seed((self.seed * 1_000_003 + epoch * 1_009 + rank) % (2**63))

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.generator.device) * (high - low) + low

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a float batch in [0, 1], shape (N, C, H, W)."""
        c, n = self.cfg, x.shape[0]
        x = x.to(self.generator.device)
        if c.hflip:
            flip = self._uniform(n, 0, 1) < c.hflip
            x = torch.where(flip[:, None, None, None], TF.horizontal_flip(x), x)
        if c.rotation or c.shear or c.translate or tuple(c.scale) != (1.0, 1.0):
            x = self._affine(x)
        if c.autocontrast:
            stretch = self._uniform(n, 0, 1) < c.autocontrast
            x = torch.where(stretch[:, None, None, None], _autocontrast(x), x)
        if c.noise:
            noise = torch.randn(x.shape, generator=self.generator, device=x.device) * c.noise
            x = (x + noise).clamp_(0.0, 1.0)
        return x

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate, shear (along x), scale and translate each image by its own draw; zeros fill."""
        c, (n, _, h, w) = self.cfg, x.shape
        angle = torch.deg2rad(self._uniform(n, -c.rotation, c.rotation))
        shear = torch.tan(torch.deg2rad(self._uniform(n, -c.shear, c.shear)))
        scale = self._uniform(n, c.scale[0], c.scale[1])
        shift = self._uniform(2 * n, -c.translate, c.translate).view(n, 2) * 2  # in [-1, 1] image units
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Forward map in pixel units around the centre: A = rotation @ shear @ scale = [[a, b], [c, d]].
        a, b = cos * scale, (cos * shear - sin) * scale
        c, d = sin * scale, (sin * shear + cos) * scale
        # grid_sample maps output to input coordinates in [-1, 1] per axis: D^-1 A^-1 D with
        # D = diag(w, h) / 2, so rotations stay rotations on non-square images. A^-1 is
        # [[d, -b], [-c, a]] / det A (det A = scale^2: rotation and shear keep areas).
        inv_det = 1 / (a * d - b * c)
        i00, i01 = d * inv_det, -b * inv_det * (h / w)
        i10, i11 = -c * inv_det * (w / h), a * inv_det
        tx, ty = shift[:, 0], shift[:, 1]
        theta = torch.stack([i00, i01, -(i00 * tx + i01 * ty), i10, i11, -(i10 * tx + i11 * ty)], dim=1).view(n, 2, 3)
        grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
        return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast of a float batch in [0, 1] (each image and channel stretched to
    [0, 1]; a constant one left as it is), with `torch.where` for its masked assignments."""
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    return ((x - torch.where(flat, 0.0, low)) / torch.where(flat, 1.0, high - low)).clamp_(0.0, 1.0)


class Compose:
    def __init__(self, *steps: Transform):
        self.steps = steps

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        for step in self.steps:
            if hasattr(step, "set_epoch"):
                step.set_epoch(epoch, rank)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


def augmentation_preview(images: torch.Tensor, cfg: AugmentConfig, seed: int, draws: int = 3) -> torch.Tensor:
    """A grid (C, H, W float in [0, 1]): the first row `images` as stored, then `draws` rows of
    the same images through the training augmentation."""
    from torchvision.utils import make_grid

    base = ToUnitFloat()(images)
    augment = BatchAugment(cfg, seed)
    rows = torch.cat([base] + [augment(base) for _ in range(draws)])
    zoom = max(1, 96 // max(rows.shape[-2:]))  # small images are enlarged (nearest) to be seen
    if zoom > 1:
        rows = rows.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
    return make_grid(rows, nrow=len(images), padding=2, pad_value=1.0)
