"""Test-time prediction: test resize, sliding-window inference, multi-scale + flip augmentation.

``predict_semantic_scores`` turns a batch of images into B×K×H×W fp32 class scores at the
input resolution, following ``model.inference`` (``InferenceConfig``):

* **Test size and scales.** Scale ``s`` resizes the image (bilinear, aspect kept) so its
  short side becomes ``s × short_side`` — or ``s ×`` its own short side when ``short_side``
  is 0 — with the long side capped at ``s × max_size`` where that is set, each side
  rounded as mmcv and detectron2 do (``int(side * factor + 0.5)``). With ``short_side`` =
  the training crop and ``max_size`` = 4× it, whole images, this is MaskFormer's test
  pipeline (detectron2's ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``; its
  multi-scale sizes are the same ratios of both); with sliding windows, mmseg's. The
  scores always come back at the size the image was given in.
* **Flip.** With ``flip`` every scale also runs on the horizontally flipped image and its
  scores are flipped back.
* **Whole image** (``window_size == 0``): one forward per view; the stride-4 mask *logits*
  are aligned to the view (``model.inference.upsample_mask_logits``: upsample ×4, crop) and
  resized to the input size before the rule, so no class-score map is resized.
* **Sliding window** (``window_size > 0``), as mmseg's ``slide_inference``: windows of
  ``window_size`` every ``window_stride`` pixels, the last one flush with the border; a
  resized image smaller than the window is padded bottom/right up to it (with the model's
  ``pixel_mean`` colour when it has one, so padding normalises to 0 as in detectron2 and
  mmseg), so every forward sees exactly ``window_size``² inputs and windows batch. Scores of
  each window are summed into the map and divided by how many windows cover each pixel;
  padded pixels are cropped away; the map is then resized (bilinear) to the input size.
* **Padded batches** (``image_sizes``): the loader pads a batch of differently sized images
  to its largest H and W. Each image is predicted from its own top-left h×w only — images
  of one size share forwards, and no forward ever holds padding or another image's pixels
  — so an image's prediction does not depend on its batch mates. (Padding with a neutral
  colour instead would still change what a model with global attention or a global pool
  sees, and a padded canvas cannot be resized to the image's test size.) Scores of padded
  pixels are 0.

The (scale, flip) views are averaged with equal weights. Forward passes hold at most
``max_batch`` images or windows (default: the input batch size, so memory stays near the
caller's single-scale pass). The model runs under the caller's autocast; the scores are fp32.

Under ZeRO-3 every forward all-gathers parameters, so ranks must run equally many; the
number of passes depends on the image sizes under sliding windows, TTA and size groups, so
with ``sync_passes`` the ranks agree on the largest count first and the others repeat a pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import InferenceConfig
from model.inference import Rule, semantic_scores


def check_inference_config(cfg: InferenceConfig) -> None:
    """One-line ValueErrors naming the ``model.inference`` key at fault."""
    if cfg.short_side < 0:
        raise ValueError(f"model.inference.short_side must be >= 0 (0 = keep the image size), got {cfg.short_side}")
    if cfg.max_size < 0:
        raise ValueError(f"model.inference.max_size must be >= 0 (0 = no cap on the long side), got {cfg.max_size}")
    if cfg.window_size < 0:
        raise ValueError(f"model.inference.window_size must be >= 0 (0 = whole image), got {cfg.window_size}")
    if cfg.window_size > 0 and not 0 < cfg.window_stride <= cfg.window_size:
        raise ValueError(
            f"model.inference.window_stride must be in [1, window_size={cfg.window_size}] for sliding-window "
            f"inference, got {cfg.window_stride} (mmseg uses 2/3 of the window, e.g. 512/341)"
        )
    if not cfg.scales or any(not (isinstance(s, (int, float)) and s > 0) for s in cfg.scales):
        raise ValueError(f"model.inference.scales must be a non-empty list of positive numbers, got {cfg.scales}")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)``; the last one ends at ``length``.

    ``length <= window`` gives ``[0]`` (the caller pads up to the window).
    """
    if length <= window:
        return [0]
    count = (length - window + stride - 1) // stride + 1
    return [min(i * stride, length - window) for i in range(count)]


def scaled_size(size: Sequence[int], scale: float, short_side: int = 0, max_size: int = 0) -> tuple[int, int]:
    """(H, W) of an image of ``size`` at ``scale``: short side ``scale × short_side`` (or
    ``scale ×`` its own when ``short_side`` is 0), long side at most ``scale × max_size``
    when that is set, aspect ratio kept."""
    factor = scale * short_side / min(size[0], size[1]) if short_side > 0 else scale
    if max_size > 0:
        factor = min(factor, scale * max_size / max(size[0], size[1]))
    return max(1, int(size[0] * factor + 0.5)), max(1, int(size[1] * factor + 0.5))


@dataclass(frozen=True)
class View:
    """One (scale, flip) version of the batch and how it is cut into forward passes."""

    scale: float
    flip: bool
    size: tuple[int, int]  # the resized image (H, W)
    padded: tuple[int, int]  # after padding up to the window (== size for whole images)
    corners: tuple[tuple[int, int], ...]  # window top-left corners; () = whole image

    def num_items(self, batch: int) -> int:
        return batch * max(1, len(self.corners))


def plan_views(image_size: Sequence[int], cfg: InferenceConfig) -> list[View]:
    views = []
    for scale in cfg.scales:
        size = scaled_size(image_size, scale, cfg.short_side, cfg.max_size)
        if cfg.window_size > 0:
            win, stride = cfg.window_size, cfg.window_stride
            padded = (max(size[0], win), max(size[1], win))
            corners = tuple((y, x) for y in window_starts(padded[0], win, stride)
                            for x in window_starts(padded[1], win, stride))
        else:
            padded, corners = size, ()
        for flip in (False, True) if cfg.flip else (False,):
            views.append(View(float(scale), flip, size, padded, corners))
    return views


def count_forward_passes(image_size: Sequence[int], batch: int, cfg: InferenceConfig, max_batch: int = 0) -> int:
    """How many forwards ``predict_semantic_scores`` runs for ``batch`` images of one size."""
    per_pass = max_batch if max_batch > 0 else batch
    return sum(math.ceil(v.num_items(batch) / per_pass) for v in plan_views(image_size, cfg))


def collective_device() -> torch.device:
    """Where tensors for a collective on the default process group must live: NCCL reduces
    only tensors on the current CUDA device, gloo only CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_across_ranks(value: int) -> int:
    """The largest ``value`` over the default process group (``value`` itself without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class _Runner:
    """Runs forwards, counting them and keeping the last input for padding passes."""

    def __init__(self, model: nn.Module, rule: Rule) -> None:
        self.model, self.rule = model, rule
        self.passes = 0
        self.last_input: Tensor | None = None

    def scores(self, inputs: Tensor, output_size: Sequence[int]) -> Tensor:
        self.passes += 1
        self.last_input = inputs
        return semantic_scores(self.model(inputs), self.rule, inputs.shape[-2:], output_size)

    def repeat(self, times: int) -> None:
        for _ in range(times):  # outputs discarded: only the collectives inside matter
            assert self.last_input is not None
            self.model(self.last_input)
            self.passes += 1


def _chunks(total: int, size: int) -> Iterator[range]:
    for start in range(0, total, size):
        yield range(start, min(start + size, total))


def _pad_value(model: nn.Module, images: Tensor) -> Tensor:
    mean = getattr(model, "pixel_mean", None)
    if isinstance(mean, Tensor) and mean.numel() == images.shape[1]:
        return mean.reshape(1, -1, 1, 1).to(images.device, images.dtype)
    return images.new_zeros(1, images.shape[1], 1, 1)


def _run_view(runner: _Runner, images: Tensor, view: View, window: int, per_pass: int) -> Tensor:
    """Scores of one view, flipped back and at the size of ``images``: B×K×H×W fp32."""
    out_size = (int(images.shape[-2]), int(images.shape[-1]))
    x = images.flip(-1) if view.flip else images
    if view.size != out_size:
        x = F.interpolate(x, size=view.size, mode="bilinear", align_corners=False)
    batch = x.shape[0]
    if not view.corners:
        scores = torch.cat([runner.scores(x[idx.start:idx.stop], out_size) for idx in _chunks(batch, per_pass)])
    else:
        if view.padded != view.size:
            canvas = _pad_value(runner.model, x).expand(batch, -1, *view.padded).clone()
            canvas[..., : view.size[0], : view.size[1]] = x
            x = canvas
        items = [(b, y, c) for b in range(batch) for (y, c) in view.corners]
        summed: Tensor | None = None
        for idx in _chunks(len(items), per_pass):
            crops = torch.stack([x[b, :, y:y + window, c:c + window] for b, y, c in (items[i] for i in idx)])
            window_scores = runner.scores(crops, (window, window))
            if summed is None:
                summed = window_scores.new_zeros(batch, window_scores.shape[1], *view.padded)
            for j, i in enumerate(idx):
                b, y, c = items[i]
                summed[b, :, y:y + window, c:c + window] += window_scores[j]
        assert summed is not None
        count = torch.zeros(view.padded, device=summed.device)
        for y, c in view.corners:
            count[y:y + window, c:c + window] += 1
        height, width = view.size
        scores = summed[..., :height, :width] / count[:height, :width]
        if view.size != out_size:
            scores = F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
    return scores.flip(-1) if view.flip else scores


def _size_groups(images: Tensor,
                 image_sizes: Sequence[Sequence[int]] | None) -> list[tuple[tuple[int, int], list[int]]]:
    """(size, batch indices) of each distinct image size, in order of first appearance."""
    full = (int(images.shape[-2]), int(images.shape[-1]))
    if image_sizes is None:
        return [(full, list(range(images.shape[0])))]
    if len(image_sizes) != images.shape[0]:
        raise ValueError(f"got {len(image_sizes)} image_sizes for a batch of {images.shape[0]} images")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(image_sizes):
        height, width = int(size[0]), int(size[1])
        if not (0 < height <= full[0] and 0 < width <= full[1]):
            raise ValueError(f"image_sizes[{index}] = {tuple(size)} does not fit the {full[0]}×{full[1]} batch")
        groups.setdefault((height, width), []).append(index)
    return list(groups.items())


@torch.no_grad()
def predict_semantic_scores(model: nn.Module, images: Tensor, inference: InferenceConfig, rule: Rule = "maskformer",
                            *, image_sizes: Sequence[Sequence[int]] | None = None, max_batch: int = 0,
                            sync_passes: bool = False) -> Tensor:
    """``images`` B×3×H×W (uint8 or float, 0..255 scale) -> fp32 class scores B×K×H×W.

    ``rule`` is the semantic inference rule (``model.name``: "maskformer" or "pft");
    ``image_sizes`` gives each image's own (h, w) in a bottom/right-padded batch (the
    loader's ``batch["image_sizes"]``; None = every image fills H×W): each is predicted
    alone at its size and its scores are 0 outside it; ``max_batch`` caps images/windows
    per forward (0 = B); ``sync_passes`` makes every rank of the default process group run
    the same number of forwards (ZeRO-3).
    """
    check_inference_config(inference)
    if images.dim() != 4:
        raise ValueError(f"expected images B×3×H×W, got shape {tuple(images.shape)}")
    batch, full = images.shape[0], (int(images.shape[-2]), int(images.shape[-1]))
    per_pass = max_batch if max_batch > 0 else batch
    groups = _size_groups(images, image_sizes)
    planned = sum(count_forward_passes(size, len(indices), inference, per_pass) for size, indices in groups)
    target = max_across_ranks(planned) if sync_passes else planned
    runner = _Runner(model, rule)
    x = images.float()  # resizing and padding need floats; the model normalises either
    scores: Tensor | None = None
    for (height, width), indices in groups:
        group = x if len(groups) == 1 and (height, width) == full else x[indices, :, :height, :width]
        views = plan_views((height, width), inference)
        total = _run_view(runner, group, views[0], inference.window_size, per_pass)
        for view in views[1:]:
            total.add_(_run_view(runner, group, view, inference.window_size, per_pass))
        if len(views) > 1:
            total.div_(len(views))
        if group is x:
            scores = total
            break
        if scores is None:
            scores = total.new_zeros(batch, total.shape[1], *full)
        scores[indices, :, :height, :width] = total
    assert scores is not None and runner.passes == planned
    runner.repeat(target - planned)
    return scores
