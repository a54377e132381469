"""Bad ``model.backbone.pretrained_path`` files are one-line errors naming the file, from
the driver's check (``launcher.preflight.check_model``) and from the worker's load alike:
truncated, empty or foreign files, another architecture's weights, missing keys named as
the file names them. Small timm test models: each case takes well under a second."""

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import os
import re

import pytest
import safetensors.torch
import timm
import torch

from launcher.config import ConfigError, load_config
from launcher.preflight import check_model
from model.backbone import Backbone

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=(64, 96), window_size=2)


def _errors(path) -> list[str]:
    """The message of the driver's check and of the worker's load; each must be one line."""
    cfg = load_config(os.path.join(CONFIGS, "demo.yaml"))  # test_resnet
    cfg.model.backbone.pretrained_path = str(path)
    messages = []
    for check, error in ((lambda: check_model(cfg), ConfigError),
                         (lambda: Backbone("test_resnet", pretrained_path=str(path)), ValueError)):
        with pytest.raises(error) as info:
            check()
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
        messages.append(message)
    return messages


def _resnet_state() -> dict[str, torch.Tensor]:
    return timm.create_model("test_resnet").state_dict()


def test_truncated_files(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(_resnet_state(), whole)
    safetensors.torch.save_file(_resnet_state(), tmp_path / "whole.safetensors")
    legacy = tmp_path / "legacy.pth"
    torch.save(_resnet_state(), legacy, _use_new_zipfile_serialization=False)
    for source, kind in ((whole, "torch"), (tmp_path / "whole.safetensors", "safetensors"), (legacy, "torch")):
        data = source.read_bytes()
        cut = tmp_path / f"cut_{source.name}"
        cut.write_bytes(data[: len(data) // 2])
        for message in _errors(cut):
            assert f"cannot be read as a {kind} file (truncated" in message
            assert f"({len(data) // 2:,} bytes)" in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x93NUMPY\x01\x00"], ids=["empty", "text", "npy"])
def test_files_of_no_known_format(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    for message in _errors(path):
        assert "is neither a torch checkpoint (torch.save) nor a .safetensors file" in message


def test_format_is_told_by_content_not_name(tmp_path):
    path = tmp_path / "model.bin"  # a safetensors file under a torch-like name
    state = _resnet_state()
    safetensors.torch.save_file(state, path)
    loaded = Backbone("test_resnet", pretrained_path=str(path))
    torch.testing.assert_close(loaded.body.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_what_is_not_a_state_dict_is_named(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    assert all("(it holds list;" in m for m in _errors(path))
    path = tmp_path / "renamed.pth"
    torch.save({"weights": _resnet_state(), "epoch": 3}, path)
    assert all("it holds keys weights, epoch" in m and "'state_dict'" in m for m in _errors(path))


def test_numpy_pickles_name_the_object(tmp_path):
    import numpy as np

    path = tmp_path / "d2.pth"  # like detectron2's .pkl files: numpy arrays
    torch.save({"conv1.weight": np.zeros(3)}, path)
    assert all("pickles Python objects besides tensors (numpy" in m for m in _errors(path))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_another_architectures_weights(tmp_path, fmt):
    state = timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN).state_dict()
    path = tmp_path / f"swin.{fmt}"
    if fmt == "pth":
        torch.save({"model": state}, path)
    else:
        safetensors.torch.save_file(state, path)
    for message in _errors(path):
        assert f"no tensor name in common with timm's 'test_resnet' ({len(state)} tensors" in message
        shown = re.search(r"first keys: (.*?); expected: conv1\.0\.weight", message).group(1)
        assert shown and all(key in state for key in shown.split(", ")), shown


def test_missing_keys_are_named_as_in_the_file(tmp_path):
    # The features model says layers_1; the classifier's file says layers.1.
    state = timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN).state_dict()
    del state["layers.1.blocks.0.mlp.fc1.weight"]
    path = tmp_path / "swin.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"1 missing key \(first: layers\.1\.blocks\.0\.mlp\.fc1\.weight\)"):
        Backbone("swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3], pretrained_path=str(path),
                 timm_kwargs=TINY_SWIN)
