"""Which files a ``launcher predict`` wrote into its output folder.

A second predict into the same ``--out`` (fewer images, another checkpoint) must not
leave the first one's maps beside its own: ``eval-semantic`` over ``labels/`` would
score them as this checkpoint's. Each predict therefore records the names it wrote in
``RECORD_FILE``, and the next one removes exactly those files before writing. PNGs no
record lists (the user's own, or a predict's from before the record existed) are kept
and named in a warning: nothing is deleted that segscale cannot tell it wrote.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from contextlib import suppress

from launcher.progress import plural
from ops.atomic_file import write_json_atomic

RECORD_FILE = "segscale-predict.json"
_TOOL = "segscale predict"  # marks the file as ours: another file of that name is never rewritten


def _recorded_names(record: str) -> list[str]:
    """The names a previous predict recorded, or a one-line ValueError naming the file."""
    try:
        with open(record) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{record}: unreadable ({err}); remove it and the PNGs of that folder it listed") from None
    if not isinstance(data, dict) or data.get("tool") != _TOOL:
        raise ValueError(f"{record}: not a record written by {_TOOL}; move it away, predict writes its own there")
    names = data.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) and n and os.sep not in n for n in names):
        raise ValueError(f"{record}: expected \"names\": a list of file names without folders")
    return names


def clear_previous(out_dir: str, folders: Sequence[str]) -> None:
    """Remove from ``folders`` the ``<name>.png`` files the last predict into ``out_dir``
    recorded; warn about PNGs in ``folders[1:]`` (the label folders) that no record lists."""
    record = os.path.join(out_dir, RECORD_FILE)
    if os.path.exists(record):
        for name in _recorded_names(record):
            for folder in folders:
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, f"{name}.png"))
        os.remove(record)
    others = sorted(p for folder in folders[1:] for p in glob.glob(os.path.join(folder, "*.png")))
    if others:
        print(f"warning: {plural(len(others), 'PNG')} in {out_dir}'s label folders are not listed in {RECORD_FILE} "
              f"(your own, or from a predict older than the record; e.g. {others[0]}): kept, and eval-semantic "
              "over these folders scores them too", flush=True)


def write_record(out_dir: str, names: Iterable[str]) -> None:
    write_json_atomic(os.path.join(out_dir, RECORD_FILE), {"tool": _TOOL, "names": sorted(names)})
