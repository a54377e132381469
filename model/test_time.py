"""Test-time prediction: sliding-window inference and multi-scale + flip augmentation.

``predict_semantic_scores`` turns a batch of images into B×K×H×W fp32 class scores at the
input resolution, following ``model.inference`` (``InferenceConfig``):

* **Scales.** Scale ``s`` resizes the input (bilinear) by ``s`` on both sides, so its short
  side becomes ``s`` × the input's short side and the aspect ratio is kept; the size is
  ``int(side * s + 0.5)`` as in mmseg. The scales are relative to the image as the loader
  delivers it: a dataset is expected to be stored (or resized) at the training short side,
  which is what mmseg's and Mask2Former's ``ratio × training scale`` amounts to.
* **Flip.** With ``flip`` every scale also runs on the horizontally flipped image and its
  scores are flipped back.
* **Whole image** (``window_size == 0``): one forward per view; the mask *logits* are
  upsampled straight to the input size before the rule (as MaskFormer/Mask2Former's
  post-processing does), so no score map is resized.
* **Sliding window** (``window_size > 0``), as mmseg's ``slide_inference``: windows of
  ``window_size`` every ``window_stride`` pixels, the last one flush with the border; a
  scaled image smaller than the window is padded bottom/right up to it (with the model's
  ``pixel_mean`` colour when it has one, so padding normalises to 0 as in detectron2 and
  mmseg), so every forward sees exactly ``window_size``² inputs and windows batch. Scores of
  each window (mask logits upsampled to the window) are summed into the map and divided by
  how many windows cover each pixel; padded pixels are cropped away; the map is then
  resized (bilinear) to the input size.

The (scale, flip) views are averaged with equal weights. Forward passes hold at most
``max_batch`` images or windows (default: the input batch size, so memory stays near the
caller's single-scale pass). The model runs under the caller's autocast; the scores are fp32.

Under ZeRO-3 every forward all-gathers parameters, so ranks must run equally many; the
number of passes depends on the image size under sliding windows and TTA, so with
``sync_passes`` the ranks agree on the largest count first and the others repeat a pass.
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
from model.inference import RULES, Rule, semantic_scores


def check_inference_config(cfg: InferenceConfig) -> None:
    """One-line ValueErrors naming the ``model.inference`` key at fault."""
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


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


@dataclass(frozen=True)
class View:
    """One (scale, flip) version of the batch and how it is cut into forward passes."""

    scale: float
    flip: bool
    size: tuple[int, int]  # the scaled image (H, W)
    padded: tuple[int, int]  # after padding up to the window (== size for whole images)
    corners: tuple[tuple[int, int], ...]  # window top-left corners; () = whole image

    def num_items(self, batch: int) -> int:
        return batch * max(1, len(self.corners))


def plan_views(image_size: Sequence[int], cfg: InferenceConfig) -> list[View]:
    views = []
    for scale in cfg.scales:
        size = scaled_size(image_size, scale)
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
    """How many forwards ``predict_semantic_scores`` runs for a batch of this size."""
    per_pass = max_batch if max_batch > 0 else batch
    return sum(math.ceil(v.num_items(batch) / per_pass) for v in plan_views(image_size, cfg))


def _max_across_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    # NCCL reduces only device tensors; gloo only CPU ones.
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=where)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class _Runner:
    """Runs forwards, counting them and keeping the last input for padding passes."""

    def __init__(self, model: nn.Module, rule: Rule) -> None:
        self.model, self.rule = model, rule
        self.passes = 0
        self.last_input: Tensor | None = None

    def scores(self, inputs: Tensor, size: Sequence[int]) -> Tensor:
        self.passes += 1
        self.last_input = inputs
        return semantic_scores(self.model(inputs), self.rule, size)

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


def _run_view(runner: _Runner, images: Tensor, view: View, window: int, per_pass: int,
              out_size: tuple[int, int]) -> Tensor:
    """Scores of one view, flipped back and at ``out_size``: B×K×H×W fp32."""
    x = images.flip(-1) if view.flip else images
    if view.size != tuple(x.shape[-2:]):
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


@torch.no_grad()
def predict_semantic_scores(model: nn.Module, images: Tensor, inference: InferenceConfig, rule: Rule = "maskformer",
                            *, max_batch: int = 0, sync_passes: bool = False) -> Tensor:
    """``images`` B×3×H×W (uint8 or float, 0..255 scale) -> fp32 class scores B×K×H×W.

    ``rule`` is the semantic inference rule (``model.name``: "maskformer" or "pft");
    ``max_batch`` caps images/windows per forward (0 = B); ``sync_passes`` makes every
    rank of the default process group run the same number of forwards (ZeRO-3).
    """
    check_inference_config(inference)
    if rule not in RULES:
        raise ValueError(f"model.name must be one of {list(RULES)} to pick a semantic inference rule, got {rule!r}")
    if images.dim() != 4:
        raise ValueError(f"expected images B×3×H×W, got shape {tuple(images.shape)}")
    batch = images.shape[0]
    out_size = (int(images.shape[-2]), int(images.shape[-1]))
    per_pass = max_batch if max_batch > 0 else batch
    views = plan_views(out_size, inference)
    runner = _Runner(model, rule)
    planned = sum(math.ceil(v.num_items(batch) / per_pass) for v in views)
    target = _max_across_ranks(planned, images.device) if sync_passes else planned
    x = images.float()  # resizing and padding need floats; the model normalises either
    total: Tensor | None = None
    for view in views:
        scores = _run_view(runner, x, view, inference.window_size, per_pass, out_size)
        total = scores if total is None else total.add_(scores)
    assert total is not None and runner.passes == planned
    runner.repeat(target - planned)
    return total.div_(len(views)) if len(views) > 1 else total
