"""One labelled sample as the member bytes of a webdataset shard sample.

Members of a sample with key ``key`` (keys must not contain dots: webdataset splits the
member name at the first dot):

* ``{key}.png``      RGB image. PNG rather than JPEG so the synthetic data round-trips
  exactly (a JPEG's ringing would blur the label/colour relation the demo relies on).
  A sample that carries its original JPEG (``image_bytes``, ``image_ext="jpg"``, see
  ``formats.common.FormatSample``) is stored as ``{key}.jpg`` byte for byte instead:
  re-encoding a photo dataset as PNG would multiply its size and change nothing.
* ``{key}.seg.png``  single-channel uint8 semantic labels, 255 = ignore.
* ``{key}.pan.png``  panoptic segment ids, COCO-style RGB: id = R + 256 G + 256^2 B.
* ``{key}.json``     ``{"height", "width", "segments_info": [...]}`` (COCO panoptic), plus
  ``"source"``: the stem of the file the sample was read from (``ADE_val_00000001``) when
  the reader knows it (``source_name``); keys are positions, so this is what lets errors
  and ``launcher predict`` name the user's files; and ``"image_id"``, the dataset's own
  image id (COCO's int), where the reader has one (panoptic outputs use it).
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, Protocol

import numpy as np
from PIL import Image

from data_pipeline.sample_members import (
    IMAGE_ID_FIELD,
    META_EXT,
    SOURCE_FIELD,
    MemberDecodeError,
    check_source_name,
    open_member,
)

IMAGE_EXT = "png"
JPEG_EXT = "jpg"
SEMANTIC_EXT = "seg.png"
PANOPTIC_EXT = "pan.png"


class LabeledSample(Protocol):
    """What a format reader returns per sample (``synthetic.SyntheticSample`` is one)."""

    image: np.ndarray  # uint8 H x W x 3 RGB
    semantic: np.ndarray  # uint8 H x W, 255 = ignore
    panoptic: np.ndarray  # int32 H x W segment ids, 0 = void
    segments: list[dict[str, Any]]  # COCO panoptic segments_info
    # Optional (read with getattr): ``image_bytes`` + ``image_ext`` "jpg" store the
    # original JPEG as ``{key}.jpg`` instead of re-encoding ``image`` as PNG;
    # ``source_name``, the source file's stem, goes into ``{key}.json`` as "source";
    # ``image_id``, the dataset's own image id (COCO's int), as "image_id".


def encode_panoptic(ids: np.ndarray) -> np.ndarray:
    """int32 H x W segment ids -> uint8 H x W x 3, COCO's id = R + 256 G + 256^2 B."""
    ids = ids.astype(np.uint32)
    return np.stack([ids & 0xFF, (ids >> 8) & 0xFF, (ids >> 16) & 0xFF], axis=-1).astype(np.uint8)


def decode_panoptic(rgb: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_panoptic``."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_member(sample: LabeledSample, key: str) -> tuple[str, bytes]:
    """(extension, bytes) of the image member: the original JPEG if the sample has one."""
    data: bytes | None = getattr(sample, "image_bytes", None)
    if data is None:
        return IMAGE_EXT, _png(sample.image)
    ext = getattr(sample, "image_ext", None)
    if ext not in ("jpg", "jpeg"):
        raise ValueError(f"{key}: image_bytes must come with image_ext 'jpg', got {ext!r}")
    try:
        size = open_member(data, JPEG_EXT, load=False).size  # header only: cheap
    except MemberDecodeError as exn:
        raise ValueError(f"{key}: image_bytes: {exn}") from None
    if size != (sample.image.shape[1], sample.image.shape[0]):
        raise ValueError(
            f"{key}: image_bytes is {size[0]}x{size[1]} (WxH) but the image array is "
            f"{sample.image.shape[1]}x{sample.image.shape[0]}"
        )
    return JPEG_EXT, data


def encode_sample(sample: LabeledSample, key: str) -> dict[str, Any]:
    """A webdataset sample dict (``__key__`` + member bytes) for one labelled sample."""
    image, semantic, panoptic = sample.image, sample.semantic, sample.panoptic
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{key}: image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if semantic.dtype != np.uint8 or semantic.shape != image.shape[:2]:
        raise ValueError(
            f"{key}: semantic must be uint8 {image.shape[:2]}, got {semantic.dtype} {semantic.shape}"
        )
    if panoptic.shape != image.shape[:2]:
        raise ValueError(f"{key}: panoptic must be {image.shape[:2]}, got {panoptic.shape}")
    meta = {"height": int(image.shape[0]), "width": int(image.shape[1]), "segments_info": sample.segments}
    source_name = getattr(sample, "source_name", None)
    if source_name is not None:
        problem = check_source_name(source_name)
        if problem is not None:  # a name for messages and file names: not worth failing the job
            print(f"warning: sample {key}: its source file name is not recorded: it {problem}", file=sys.stderr)
        else:
            meta[SOURCE_FIELD] = source_name
    image_id = getattr(sample, "image_id", None)
    if image_id is not None:
        meta[IMAGE_ID_FIELD] = image_id
    image_ext, image_bytes = _image_member(sample, key)
    return {
        "__key__": key,
        image_ext: image_bytes,
        SEMANTIC_EXT: _png(semantic),
        PANOPTIC_EXT: _png(encode_panoptic(panoptic)),
        META_EXT: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
