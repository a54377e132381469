"""One shard sample's members as the readers need them: the name of the file it came
from, how messages name the sample, and image members decoded with plain error text.

Sample keys are positions (``val_00000000``): resume positions and the train stream rely
on them. The source file's stem (``ADE_val_00000001``) is recorded in the sample's
``.json`` member as ``"source"`` by the shard writer, so errors and ``launcher predict``'s
output files can name what the user has on disk. Shards written before that, and the
synthetic data, have no source; everything then falls back to the key. Readers of
datasets with their own image ids (COCO) also record ``"image_id"``, which panoptic
outputs use so they pair with the dataset's annotation files.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

SOURCE_FIELD = "source"  # key in the sample's .json member
IMAGE_ID_FIELD = "image_id"  # likewise: the dataset's own image id, where it has one
META_EXT = "json"
# PIL's messages embed the repr of the BytesIO it read from, which means nothing to a user.
_BYTESIO_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_KINDS = {"jpg": "JPEG", "jpeg": "JPEG"}


def check_source_name(name: Any) -> str | None:
    """Why ``name`` cannot be a source stem (it becomes a file name in ``predict``), or None."""
    if not isinstance(name, str) or not name:
        return f"must be a non-empty string, got {name!r}"
    if name in (".", "..") or "/" in name:
        return f"must be a file name without folders, got {name!r}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):  # would break one-line messages
        return f"must not contain control characters, got {name!r}"
    return None


def _meta_field(members: dict[str, Any], field: str) -> Any:
    meta = members.get(META_EXT)
    if not meta:
        return None
    try:
        return json.loads(meta).get(field)
    except (ValueError, AttributeError):  # undecodable, not JSON, or not an object
        return None


def sample_source(members: dict[str, Any]) -> str | None:
    """The source file stem recorded in a raw sample's ``.json`` member, if any and usable.

    Never raises: a sample's name is for messages and output file names, and a missing
    or odd one must not stop training (``verify`` reports an odd one).
    """
    name = _meta_field(members, SOURCE_FIELD)
    return name if check_source_name(name) is None else None


def sample_image_id(members: dict[str, Any]) -> int | str | None:
    """The dataset's own image id recorded in a raw sample's ``.json`` member (an int for
    COCO), or None where none was recorded or it is neither an int nor a string."""
    image_id = _meta_field(members, IMAGE_ID_FIELD)
    ok = isinstance(image_id, (int, str)) and not isinstance(image_id, bool)
    return image_id if ok else None


def image_mode_problem(mode: str) -> str | None:
    """Why an image member of PIL ``mode`` cannot train, or None. The loader converts
    8-bit gray, palette and RGBA images to RGB and a 16-bit gray one by its high byte
    (``data_pipeline.decode``); 32-bit pixels have no conversion to 8 bits that is not a
    guess. ``verify`` applies the same rule."""
    if mode in ("I", "F"):
        return f"has 32-bit pixels (PIL mode {mode}); expected an 8-bit (or 16-bit grayscale) image"
    return None


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """uint8 H x W x 3 of any 8-bit mode (gray, palette, RGBA: PIL's conversion), and of a
    16-bit grayscale image by its high byte, as PIL itself reads a 16-bit RGB PNG: PIL's
    own conversion of 16-bit gray to RGB clips every value above 255, a near-white image.
    ValueError (``image_mode_problem``'s words) for 32-bit pixels. The sharding readers
    and the training loader both convert with this."""
    if image.mode == "RGB":
        return np.array(image)
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    problem = image_mode_problem(image.mode)
    if problem is not None:
        raise ValueError(problem)
    return np.array(image.convert("RGB"))


def sample_label(key: str, source: str | None) -> str:
    """``val_00000000 (ADE_val_00000001)``, or the key alone when the source is unknown."""
    return f"{key} ({source})" if source and source != key else key


def output_stem(source: str | None, key: str, used: set[str]) -> str:
    """The file name (without extension) under which a sample's predictions or exported
    ground truth are written: its source stem, or its key where it has none or the stem is
    taken (two source files of one name, in this batch or an earlier one); one output must
    never overwrite another's. Adds the name to ``used``. Writers that go through one split
    in the same order (``launcher predict``, ``export-panoptic``) give a sample the same name."""
    name = source if source and source not in used else key
    while name in used:  # a key that equals an earlier sample's source stem
        name = f"{name}_"
    used.add(name)
    return name


def describe_raw(raw: dict[str, Any]) -> str:
    """Where a raw loader sample comes from, for a one-line error: shard, key and source."""
    return f"shard {raw.get('__url__')}: sample {sample_label(str(raw.get('__key__')), sample_source(raw))}"


def decode_error(exn: BaseException, ext: str) -> str:
    """A one-line reason why member ``.ext`` did not decode, without PIL's BytesIO repr."""
    kind = _KINDS.get(ext.rsplit(".", 1)[-1], ext.rsplit(".", 1)[-1].upper())
    if isinstance(exn, UnidentifiedImageError):
        return f".{ext} is not a decodable {kind}"
    detail = _BYTESIO_REPR.sub("", str(exn)).strip() or type(exn).__name__
    return f".{ext} does not decode as {kind}: {detail}"


class MemberDecodeError(ValueError):
    """An image member that PIL cannot decode; the message is ``decode_error``'s line."""


def open_member(data: bytes, ext: str, load: bool = True) -> Image.Image:
    """Open (and with ``load``, fully decode: PIL is lazy) the bytes of member ``.ext``."""
    try:
        image = Image.open(io.BytesIO(data))
        if load:
            image.load()
        return image
    except Exception as exn:  # PIL raises many types for bad data
        raise MemberDecodeError(decode_error(exn, ext)) from exn
