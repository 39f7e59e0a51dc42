"""Training-time augmentations on a batch (N, C, *spatial), 2D or 3D.

Each augmentation draws its random numbers from a ``torch.Generator`` (on the CPU; a device-side
generator seeded from it for the noise tensor on GPU), so a run is reproducible from one seed.
They never modify their input in place and keep its shape, dtype and device. Per image:

- :class:`Noise`: add N(0, s) with s ~ U(0, ``max_std``), default 0.1 (image intensity units);
- :class:`Erasing`: with probability ``p`` (0.5) set one random box (cuboid in 3D) to 0 in all
  channels; its volume is a fraction U(0.02, 0.33) of the image, its side ratios log-uniform in
  (0.3, 3.3) (torchvision's RandomErasing, generalised to 3D);
- :class:`CropPad`: translate by an integer shift U{-``max_shift``..``max_shift``} px per axis
  (default 10), filling with 0;
- :class:`Smoothing`: Gaussian blur with sigma ~ U(0, ``max_sigma``) px (default 1), separable,
  edges replicated;
- :class:`Flip`: mirror each spatial axis with probability ``p`` (default 0.5), independently.

An augmentation is named by a spec string, ``"name"`` or ``"name:value"`` where the value is its one
parameter: ``noise:max_std``, ``erasing:p``, ``croppad:max_shift``, ``smoothing:max_sigma``,
``flip:p`` (e.g. ``"croppad:3"`` shifts by at most 3 px, right for a 32-voxel input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("noise", "erasing", "croppad", "smoothing", "flip")


def _uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """U(low, high) float64 samples on the CPU."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _per_image(values: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(N,) values shaped (N, 1, 1, ...) to broadcast over ``batch``, on its device and dtype."""
    return values.reshape(-1, *([1] * (batch.ndim - 1))).to(device=batch.device, dtype=batch.dtype)


class Noise:
    """Additive Gaussian noise N(0, s), s ~ U(0, max_std) per image."""

    def __init__(self, max_std: float = 0.1) -> None:
        if max_std < 0:
            raise ValueError(f"max_std must be >= 0, got {max_std}")
        self.max_std = max_std

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        std = _uniform(batch.shape[0], 0.0, self.max_std, generator)
        if batch.device.type == "cpu":
            noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype)
        else:
            device_generator = torch.Generator(device=batch.device)
            device_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            noise = torch.randn(batch.shape, generator=device_generator, dtype=batch.dtype, device=batch.device)
        return batch + _per_image(std, batch) * noise


class Erasing:
    """Random erasing: with probability ``p`` per image, one random box set to 0 in all channels."""

    def __init__(
        self,
        p: float = 0.5,
        area: tuple[float, float] = (0.02, 0.33),
        aspect: tuple[float, float] = (0.3, 3.3),
        attempts: int = 10,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"area must be 0 < low <= high <= 1, got {area}")
        if not 0.0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be 0 < low <= high, got {aspect}")
        self.p, self.area, self.aspect, self.attempts = p, area, aspect, attempts

    def _box(self, spatial: Sequence[int], generator: torch.Generator) -> tuple[slice, ...] | None:
        """A random box inside ``spatial`` or None if no draw fitted (then nothing is erased)."""
        dims = len(spatial)
        for _ in range(self.attempts):
            volume = math.prod(spatial) * float(_uniform((), *self.area, generator))
            log_aspects = _uniform(dims - 1, math.log(self.aspect[0]), math.log(self.aspect[1]), generator)
            log_ratios = torch.cat([log_aspects, torch.zeros(1, dtype=torch.float64)])
            ratios = torch.exp(log_ratios - log_ratios.mean())  # product of ratios is 1
            sides = [round(volume ** (1.0 / dims) * float(r)) for r in ratios]
            if all(1 <= s <= n for s, n in zip(sides, spatial)):
                starts = [int(torch.randint(n - s + 1, (1,), generator=generator)) for s, n in zip(sides, spatial)]
                return tuple(slice(a, a + s) for a, s in zip(starts, sides))
        return None

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = batch.clone()
        erase = torch.rand(batch.shape[0], generator=generator) < self.p
        for index in torch.nonzero(erase).flatten().tolist():
            box = self._box(batch.shape[2:], generator)
            if box is not None:
                out[(index, slice(None), *box)] = 0
        return out


class CropPad:
    """Translation by up to ``max_shift`` px per axis (uniform integer), zero fill."""

    def __init__(self, max_shift: int = 10) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spatial = batch.shape[2:]
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (batch.shape[0], len(spatial)), generator=generator)
        out = torch.zeros_like(batch)
        for index, shift in enumerate(shifts.tolist()):
            if any(abs(s) >= n for s, n in zip(shift, spatial)):
                continue  # shifted entirely out of the grid: all zeros
            source = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, spatial))
            target = tuple(slice(max(s, 0), n - max(-s, 0)) for s, n in zip(shift, spatial))
            out[(index, slice(None), *target)] = batch[(index, slice(None), *source)]
        return out


class Smoothing:
    """Gaussian blur, sigma ~ U(0, max_sigma) px per image, separable, replicate padding."""

    def __init__(self, max_sigma: float = 1.0) -> None:
        if max_sigma <= 0:
            raise ValueError(f"max_sigma must be > 0, got {max_sigma}")
        self.max_sigma = max_sigma
        self.radius = max(1, math.ceil(3 * max_sigma))

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, *spatial = batch.shape
        dims = len(spatial)
        sigma = _uniform(n, 0.0, self.max_sigma, generator).clamp_min(1e-6)
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernels = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        kernels = kernels.to(device=batch.device, dtype=batch.dtype)  # (n * c, 2 * radius + 1)
        conv = F.conv2d if dims == 2 else F.conv3d
        out = batch.reshape(1, n * c, *spatial)  # one group per (image, channel)
        for axis in range(dims):
            shape = [n * c, 1] + [1] * dims
            shape[2 + axis] = kernels.shape[1]
            pad = [0, 0] * dims
            pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = self.radius  # F.pad lists the last axis first
            out = conv(F.pad(out, pad, mode="replicate"), kernels.reshape(shape), groups=n * c)
        return out.reshape(batch.shape)


class Flip:
    """Mirror each spatial axis with probability ``p`` per image and axis."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spatial_dims = batch.ndim - 2
        flips = torch.rand((batch.shape[0], spatial_dims), generator=generator, dtype=torch.float64) < self.p
        out = batch.clone()
        for index, axes in enumerate(flips.tolist()):
            dims = [1 + axis for axis, flip in enumerate(axes) if flip]  # batch[index] is (C, *spatial)
            if dims:
                out[index] = batch[index].flip(dims)
        return out


# name -> (class, the keyword its spec value sets, how the value is read)
_BY_NAME = {
    "noise": (Noise, "max_std", float),
    "erasing": (Erasing, "p", float),
    "croppad": (CropPad, "max_shift", int),
    "smoothing": (Smoothing, "max_sigma", float),
    "flip": (Flip, "p", float),
}


def parse_augmentation(spec: str):
    """The augmentation object of one spec string (``"croppad"``, ``"croppad:3"``; see the module docstring).

    Raises ``ValueError`` naming the spec when the name is unknown or the value is not valid.
    """
    if not isinstance(spec, str):
        raise TypeError(f"an augmentation is named by a string, got {spec!r}")
    name, _, value = spec.partition(":")
    if name not in _BY_NAME:
        raise ValueError(
            f"unknown augmentation {spec!r}; choose from {', '.join(AUGMENTATIONS)} (optionally name:value)"
        )
    cls, keyword, read = _BY_NAME[name]
    if not value:
        return cls()
    try:
        return cls(**{keyword: read(value)})
    except ValueError as error:
        raise ValueError(f"augmentation {spec!r}: {keyword} must be a valid {read.__name__} ({error})") from None


class ComposedAugmentation:
    """Applies named augmentations in order, drawing from one generator seeded with ``seed``.

    Call it on a float batch (N, C, H, W) or (N, C, D, H, W); returns a new tensor of the same
    shape, dtype and device (the input itself when no augmentation is chosen).
    """

    def __init__(self, names: Sequence[str], seed: int = 0) -> None:
        self.names = tuple(names)
        self.transforms = [parse_augmentation(name) for name in self.names]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.ndim not in (4, 5) or not batch.is_floating_point():
            raise TypeError("augmentations need a float tensor (N, C, H, W) or (N, C, D, H, W)")
        for transform in self.transforms:
            batch = transform(batch, self.generator)
        return batch

    def __repr__(self) -> str:
        return f"ComposedAugmentation({list(self.names)})"


def build_augmentation(names: Sequence[str], seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compose the augmentations ``names`` (spec strings: a name of :data:`AUGMENTATIONS`, optionally
    ``name:value``); [] is the identity. Raises ValueError/TypeError for an unknown or invalid spec."""
    if isinstance(names, str):
        raise TypeError(f"names must be a list of augmentation names, got the string {names!r}")
    return ComposedAugmentation(names, seed=seed)
