"""Training augmentation and MaskFormer target construction, on torch tensors.

Images are uint8 ``3 x H x W`` (the model normalises, so augmentation never needs
floating point), label maps int64 ``H x W`` with ``ignore_index`` (255) for unlabelled
pixels. Randomness comes only from the ``torch.Generator`` passed in, so a stream seeded
per (seed, epoch, rank, worker) is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_hflip(
    image: torch.Tensor, semantic: torch.Tensor, generator: torch.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and labels left-right together with probability ``p``."""
    if torch.rand((), generator=generator).item() < p:
        return image.flip(-1), semantic.flip(-1)
    return image, semantic


def pad_to(
    image: torch.Tensor, semantic: torch.Tensor, height: int, width: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to at least ``height`` x ``width``: image with 0, labels with ignore.

    Padding with the ignore label means padded pixels cost nothing in the loss and count
    nowhere in the metrics.
    """
    pad_h, pad_w = max(0, height - image.shape[-2]), max(0, width - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image, semantic
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
    semantic = F.pad(semantic, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, semantic


def random_crop_pad(
    image: torch.Tensor,
    semantic: torch.Tensor,
    crop_size: int,
    generator: torch.Generator,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``crop_size`` x ``crop_size`` window: pad a short side, then crop at a random offset."""
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    image, semantic = pad_to(image, semantic, crop_size, crop_size, ignore_index)
    height, width = semantic.shape
    top = int(torch.randint(0, height - crop_size + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_size + 1, (), generator=generator))
    return (
        image[..., top : top + crop_size, left : left + crop_size],
        semantic[top : top + crop_size, left : left + crop_size],
    )


def train_augment(
    image: torch.Tensor,
    semantic: torch.Tensor,
    crop_size: int,
    generator: torch.Generator,
    hflip: bool = True,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The skeleton's training augmentation: random crop/pad, then random horizontal flip."""
    image, semantic = random_crop_pad(image, semantic, crop_size, generator, ignore_index)
    if hflip:
        image, semantic = random_hflip(image, semantic, generator)
    return image.contiguous(), semantic.contiguous()


def semantic_to_targets(semantic: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """MaskFormer's semantic targets: one binary mask per class present (ignore excluded).

    Returns ``{"labels": int64[n], "masks": bool[n, H, W]}`` with labels sorted ascending;
    ``n`` is 0 for an image that is all ignore.
    """
    if semantic.ndim != 2:
        raise ValueError(f"semantic must be H x W, got shape {tuple(semantic.shape)}")
    labels = torch.unique(semantic)  # sorted
    labels = labels[labels != ignore_index].to(torch.int64)
    masks = semantic.unsqueeze(0) == labels.view(-1, 1, 1)
    return {"labels": labels, "masks": masks}
