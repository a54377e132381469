"""Panoptic quality (PQ = SQ x RQ) by the COCO panoptic API's rules (panopticapi/evaluation.py).

A panoptic map is an integer map of segment ids (in a COCO-panoptic PNG, id = R + 256 G +
256^2 B); each segment has a ``category_id`` and, in the ground truth, an ``iscrowd`` flag.
Ground-truth id 0 is void; prediction id 0 is unlabelled (no segment). Per image:

* a prediction matches a ground-truth segment of the same category when their IoU > 0.5,
  where the union leaves out the prediction's pixels on ground-truth void (so spilling
  onto void costs nothing). IoU > 0.5 makes each match unique. Crowd segments never match.
* a non-crowd ground-truth segment left unmatched is a false negative (crowd never is).
* an unmatched prediction is a false positive unless more than half of its pixels lie on
  void or on crowd segments of its own category.

Per category the sums of matched IoU, TP, FP and FN are accumulated over all images; then
PQ_c = sum IoU / (TP + FP/2 + FN/2), SQ_c = sum IoU / TP, RQ_c = TP / (TP + FP/2 + FN/2),
and All / Things / Stuff average over the categories (``isthing`` 1 / 0) that have any
TP + FP + FN; categories absent from both sides are left out, as panopticapi does.

Segment areas are counted from the maps (the JSON's ``area`` is ignored, as panopticapi
does). One difference: panopticapi's crowd rule only sees the last crowd segment of a
category in an image; here all of them count. COCO merges each category's crowd into one
segment, so both agree on COCO.

The statistics are a float64 ``(categories, 4)`` array [iou, tp, fp, fn] (counts are exact
in float64 up to 2^53), so ranks or worker processes sum them: ``merge``, ``all_reduce``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

OFFSET = 256**3  # ids fit in 24 bits (RGB), so gt * OFFSET + pred is a unique pair key
VOID = 0
IOU, TP, FP, FN = range(4)


class PanopticFormatError(ValueError):
    """A panoptic map and its segment list disagree (or name an unknown category)."""


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 COCO-panoptic colours -> H x W int64 ids (R + 256 G + 256^2 B)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise PanopticFormatError(f"expected an H x W x 3 RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """H x W ids (0 <= id < 256^3) -> H x W x 3 uint8 colours; the inverse of ``rgb_to_id``."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise PanopticFormatError(f"segment ids must be in [0, {OFFSET}), got {ids.min()}..{ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def _as_numpy(ids) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).astype(np.int64, copy=False)


class PanopticAccumulator:
    """Per-category [IoU sum, TP, FP, FN] over a dataset; ``results()`` gives PQ / SQ / RQ.

    ``categories``: COCO ``categories`` entries (``id``, ``isthing``, optional ``name``).
    """

    def __init__(self, categories: Sequence[Mapping]):
        if not categories:
            raise PanopticFormatError("no categories given")
        self.category_ids = np.asarray([int(c["id"]) for c in categories], dtype=np.int64)
        if len(np.unique(self.category_ids)) != len(self.category_ids):
            raise PanopticFormatError("category ids are not unique")
        self.isthing = np.asarray([bool(c.get("isthing", 0)) for c in categories])
        self.names = [str(c.get("name", c["id"])) for c in categories]
        self._index = {int(cid): i for i, cid in enumerate(self.category_ids)}
        self.stats = np.zeros((len(categories), 4), dtype=np.float64)

    # -- one image ------------------------------------------------------------------------
    def _segments(
        self, ids: np.ndarray, pixels: np.ndarray, segments: Sequence[Mapping], source: str, is_gt: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Check ``segments`` against the ids a map holds (``ids``, with their ``pixels``, possibly
        repeated); sorted segment ids, category indexes, crowd flags, areas."""
        seg_ids = np.asarray([int(s["id"]) for s in segments], dtype=np.int64)
        cats = np.empty(len(segments), dtype=np.int64)
        crowd = np.zeros(len(segments), dtype=bool)
        for k, s in enumerate(segments):
            index = self._index.get(int(s["category_id"]))
            if index is None:
                raise PanopticFormatError(
                    f"{source}: segment id {int(s['id'])} has unknown category_id {s['category_id']}"
                )
            cats[k] = index
            crowd[k] = is_gt and bool(s.get("iscrowd", 0))
        if (seg_ids == VOID).any():
            raise PanopticFormatError(
                f"{source}: segment id 0 is listed in segments_info, but 0 is reserved "
                "for void/unlabelled pixels"
            )
        uniq, first = np.unique(seg_ids, return_index=True)
        if len(uniq) != len(seg_ids):
            dup = np.setdiff1d(np.arange(len(seg_ids)), first)[0]
            raise PanopticFormatError(f"{source}: segment id {seg_ids[dup]} is listed twice in segments_info")
        order = np.argsort(seg_ids)
        seg_ids, cats, crowd = seg_ids[order], cats[order], crowd[order]
        present, where = np.unique(ids, return_inverse=True)
        counts = np.bincount(where.reshape(-1), pixels, minlength=len(present)).astype(np.int64)
        listed = np.isin(present, seg_ids)
        unlisted = present[~listed & (present != VOID)]
        if len(unlisted):
            raise PanopticFormatError(
                f"{source}: segment id {unlisted[0]} is in the PNG but not in segments_info"
                f" ({len(unlisted)} such ids)"
            )
        absent = seg_ids[~np.isin(seg_ids, present)]
        if len(absent):
            raise PanopticFormatError(
                f"{source}: segment id {absent[0]} is in segments_info but not in the PNG"
                f" ({len(absent)} such ids)"
            )
        areas = np.zeros(len(seg_ids), dtype=np.int64)
        areas[np.searchsorted(seg_ids, present[listed])] = counts[listed]
        return seg_ids, cats, crowd, areas

    def update(
        self,
        gt_ids,
        gt_segments: Sequence[Mapping],
        pred_ids,
        pred_segments: Sequence[Mapping],
        gt_source: str = "ground truth",
        pred_source: str = "prediction",
    ) -> None:
        """Add one image: two H x W id maps and their ``segments_info`` lists (``id``,
        ``category_id``, ground truth also ``iscrowd``). Raises ``PanopticFormatError``
        (naming ``gt_source`` / ``pred_source`` and the id) when a list and its map disagree."""
        gt, pred = _as_numpy(gt_ids), _as_numpy(pred_ids)
        if gt.shape != pred.shape:
            raise PanopticFormatError(
                f"{pred_source}: size {tuple(pred.shape)} differs from its ground truth "
                f"{gt_source} {tuple(gt.shape)}"
            )
        for ids, source in ((gt, gt_source), (pred, pred_source)):
            if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
                raise PanopticFormatError(f"{source}: segment ids must be in [0, {OFFSET})")
        # Every (gt id, pred id) pair that shares pixels, with its intersection in pixels: the
        # one pass over the pixels; each map's ids and areas follow from the pairs.
        keys, inter = np.unique(gt.reshape(-1) * OFFSET + pred.reshape(-1), return_counts=True)
        pair_g, pair_p = keys // OFFSET, keys % OFFSET
        g_ids, g_cat, g_crowd, g_area = self._segments(pair_g, inter, gt_segments, gt_source, is_gt=True)
        p_ids, p_cat, _, p_area = self._segments(pair_p, inter, pred_segments, pred_source, is_gt=False)
        # Segment index of each side; void / unlabelled point at a sentinel entry appended to
        # each array (category -1 vs -2, so a sentinel never shares a category with anything).
        ng, npred = len(g_ids), len(p_ids)
        gi = np.where(pair_g != VOID, np.searchsorted(g_ids, pair_g), ng)
        pi = np.where(pair_p != VOID, np.searchsorted(p_ids, pair_p), npred)
        g_cat, g_crowd, g_area = np.append(g_cat, -1), np.append(g_crowd, False), np.append(g_area, 0)
        p_cat, p_area = np.append(p_cat, -2), np.append(p_area, 0)

        on_void = np.bincount(pi, np.where(gi == ng, inter, 0), minlength=npred + 1)  # pred pixels on void
        same_cat = g_cat[gi] == p_cat[pi]
        # Matches: same category, not crowd, IoU > 0.5 with void removed from the union.
        candidate = same_cat & ~g_crowd[gi]
        union = p_area[pi] + g_area[gi] - inter - on_void[pi]
        iou = np.where(candidate, inter / np.maximum(union, 1), 0.0)
        matched = candidate & (iou > 0.5)
        k = len(self.category_ids)
        self.stats[:, IOU] += np.bincount(g_cat[gi[matched]], iou[matched], minlength=k)
        self.stats[:, TP] += np.bincount(g_cat[gi[matched]], minlength=k)
        g_matched = np.zeros(ng + 1, dtype=bool)
        g_matched[gi[matched]] = True
        p_matched = np.zeros(npred + 1, dtype=bool)
        p_matched[pi[matched]] = True

        fn = ~g_matched[:ng] & ~g_crowd[:ng]  # crowd is never a false negative
        self.stats[:, FN] += np.bincount(g_cat[:ng][fn], minlength=k)
        # Unmatched predictions mostly (> 1/2) on void or on their own category's crowd are ignored.
        on_crowd = np.bincount(pi, np.where(same_cat & g_crowd[gi], inter, 0), minlength=npred + 1)
        ignored = (on_void + on_crowd)[:npred] > 0.5 * p_area[:npred]
        fp = ~p_matched[:npred] & ~ignored
        self.stats[:, FP] += np.bincount(p_cat[:npred][fp], minlength=k)

    # -- across images, processes and ranks -----------------------------------------------
    def _check_same(self, other: PanopticAccumulator) -> None:
        if not np.array_equal(self.category_ids, other.category_ids):
            raise ValueError("cannot merge panoptic accumulators over different categories")

    def merge(self, other: PanopticAccumulator) -> PanopticAccumulator:
        """Add ``other``'s images to this accumulator (returns ``self``)."""
        self._check_same(other)
        self.stats += other.stats
        return self

    def to_tensor(self):
        """The statistics as a float64 torch tensor (categories x [iou, tp, fp, fn])."""
        import torch

        return torch.from_numpy(self.stats.copy())

    def load_tensor(self, tensor) -> None:
        """Replace the statistics by ``tensor`` (e.g. the sum of every rank's ``to_tensor()``)."""
        array = tensor.detach().cpu().double().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        if array.shape != self.stats.shape:
            raise ValueError(f"statistics of shape {array.shape} do not fit {self.stats.shape}")
        self.stats = np.array(array, dtype=np.float64)

    def all_reduce(self) -> None:
        """Sum the statistics over the default process group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from model.tta import collective_device

            tensor = self.to_tensor().to(collective_device())
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            self.load_tensor(tensor)

    # -- numbers ----------------------------------------------------------------------------
    def results(self) -> dict:
        """``{"All"|"Things"|"Stuff": {pq, sq, rq, n}, "per_class": [...]}``; values in [0, 1]."""
        iou, tp, fp, fn = self.stats.T
        denominator = tp + 0.5 * fp + 0.5 * fn
        present = denominator > 0
        pq = np.where(present, iou / np.maximum(denominator, 1e-12), 0.0)
        sq = np.where(tp > 0, iou / np.maximum(tp, 1), 0.0)
        rq = np.where(present, tp / np.maximum(denominator, 1e-12), 0.0)
        out: dict = {}
        for group, member in (
            ("All", np.ones_like(present)),
            ("Things", self.isthing),
            ("Stuff", ~self.isthing),
        ):
            use = present & member
            n = int(use.sum())
            out[group] = {
                "pq": float(pq[use].mean()) if n else 0.0,
                "sq": float(sq[use].mean()) if n else 0.0,
                "rq": float(rq[use].mean()) if n else 0.0,
                "n": n,
            }
        out["per_class"] = [
            {
                "id": int(self.category_ids[c]),
                "name": self.names[c],
                "isthing": bool(self.isthing[c]),
                "pq": float(pq[c]),
                "sq": float(sq[c]),
                "rq": float(rq[c]),
                "tp": int(tp[c]),
                "fp": int(fp[c]),
                "fn": int(fn[c]),
                "counted": bool(present[c]),
            }
            for c in range(len(self.category_ids))
        ]
        return out


def format_table(results: Mapping) -> str:
    """The panopticapi summary: PQ, SQ, RQ (in %) and category count N for All / Things / Stuff."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}  {'N':>5s}", "-" * 38]
    for group in ("All", "Things", "Stuff"):
        r = results[group]
        lines.append(
            f"{group:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f}  {r['n']:5d}"
        )
    return "\n".join(lines)
