import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import pytest
import safetensors.torch
import timm
import torch

from model.backbone import Backbone, build_backbone
from model.config import BackboneConfig

# A Swin small enough for CPU tests; NHWC outputs like the real ones, and the same
# flattened module names (``layers_0``) as swin_tiny/small/base/large.
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=(64, 96), window_size=2)


def test_resnet_pyramid_shapes_and_strides():
    backbone = build_backbone(BackboneConfig(name="test_resnet", out_indices=[1, 2, 3, 4]))
    assert backbone.strides == [4, 8, 16, 32]
    assert not backbone.nhwc
    features = backbone(torch.randn(2, 3, 64, 96))
    assert len(features) == 4
    for f, c, s in zip(features, backbone.channels, backbone.strides):
        assert f.shape == (2, c, 64 // s, 96 // s)


@pytest.mark.parametrize(
    "name,kwargs", [("test_mambaout", {}), ("swin_tiny_patch4_window7_224", TINY_SWIN)], ids=["mambaout", "swin"]
)
def test_nhwc_backbones_come_out_nchw(name, kwargs):
    backbone = Backbone(name, out_indices=[0, 1, 2, 3], timm_kwargs=kwargs)
    assert backbone.nhwc  # the timm wrapper itself returns NHWC
    assert backbone.strides == [4, 8, 16, 32]
    # A non-square input: NHWC vs NCHW cannot be confused by equal sizes.
    features = backbone(torch.randn(1, 3, 64, 96))
    for f, c, s in zip(features, backbone.channels, backbone.strides):
        assert f.shape == (1, c, 64 // s, 96 // s)
        assert f.is_contiguous()


def test_clear_errors_for_bad_backbone_configs():
    with pytest.raises(ValueError, match=r"model\.backbone\.name='no_such_net'"):
        Backbone("no_such_net")
    with pytest.raises(ValueError, match=r"out_indices=\[1, 2, 3, 4\] is out of range"):
        Backbone("test_mambaout", out_indices=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="strictly increasing strides"):
        Backbone("test_vit", out_indices=[0, 1, 2])  # all at stride 16
    with pytest.raises(ValueError, match=r"model\.backbone\.timm_kwargs"):
        Backbone("test_resnet", timm_kwargs={"no_such_arg": 1})


def test_grad_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = Backbone("test_resnet")
    ckpt = Backbone("test_resnet", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.body.grad_checkpointing
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        sum(f.square().mean() for f in model(x)).backward()
        grads.append(model.body.layer2[0].conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_pretrained_roundtrip_pth_nested_and_safetensors(tmp_path):
    torch.manual_seed(1)
    source = Backbone("test_resnet")
    pth = tmp_path / "weights.pth"
    torch.save({"model": source.body.state_dict(), "epoch": 3}, pth)
    st = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.body.state_dict().items()}, st)
    torch.manual_seed(2)
    fresh = Backbone("test_resnet")
    with pytest.raises(AssertionError):
        _assert_same_weights(source, fresh)  # different seeds really differ
    for path in (pth, st):
        loaded = Backbone("test_resnet", pretrained_path=str(path))
        _assert_same_weights(source, loaded)


@pytest.mark.parametrize(
    "name,kwargs", [("test_resnet", {}), ("swin_tiny_patch4_window7_224", TINY_SWIN)], ids=["resnet", "swin"]
)
def test_pretrained_from_full_classification_model(tmp_path, name, kwargs):
    # What users have on disk: the whole timm classifier (head included; for Swin,
    # ``layers.0`` names where the features wrapper has ``layers_0``).
    torch.manual_seed(3)
    full = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / "full.pt"
    torch.save({"state_dict": full.state_dict()}, path)
    out_indices = [1, 2, 3, 4] if name == "test_resnet" else [0, 1, 2, 3]
    backbone = Backbone(name, out_indices=out_indices, pretrained_path=str(path), timm_kwargs=kwargs)
    full_state = full.state_dict()
    for key, value in backbone.body.state_dict().items():
        original = key if key in full_state else key.replace("_", ".", 1)
        torch.testing.assert_close(value, full_state[original], msg=key)


def test_pretrained_missing_file_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"no such file: {missing}"):
        Backbone("test_resnet", pretrained_path=str(missing))


def test_pretrained_mismatched_shapes_and_missing_keys_errors(tmp_path):
    state = Backbone("test_resnet").body.state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 1, 1)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(ValueError) as info:
        Backbone("test_resnet", pretrained_path=str(bad_shape))
    message = str(info.value)
    assert str(bad_shape) in message and "conv1.0.weight (3, 3, 1, 1)" in message and "\n" not in message

    del state["conv1.0.weight"], state["layer1.0.bn1.weight"]
    missing_keys = tmp_path / "missing_keys.pth"
    torch.save(state, missing_keys)
    with pytest.raises(ValueError, match=r"missing_keys\.pth .*2 missing keys \(first: conv1\.0\.weight, layer1\.0\.bn1"):
        Backbone("test_resnet", pretrained_path=str(missing_keys))

    other = tmp_path / "other_model.pth"
    torch.save(Backbone("test_mambaout", out_indices=[0, 1, 2, 3]).body.state_dict(), other)
    with pytest.raises(ValueError, match="missing keys"):
        Backbone("test_resnet", pretrained_path=str(other))


def test_pretrained_file_with_pickled_objects_is_refused_clearly(tmp_path):
    import argparse

    path = tmp_path / "with_args.pth"
    torch.save({"model": Backbone("test_resnet").body.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match=r"with_args\.pth pickles Python objects"):
        Backbone("test_resnet", pretrained_path=str(path))
