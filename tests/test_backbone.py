import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import warnings

import pytest
import safetensors.torch
import timm
import torch
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.layers.freeze_batch_norm_2d makes

from model.backbone import Backbone, build_backbone
from model.config import BackboneConfig
from model.swin_block import SwinBlock, use_segmentation_swin_blocks

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
        Backbone("test_resnet", out_indices=[3, 2])  # strides 16, 8
    with pytest.raises(ValueError, match=r"out_indices=\[0, 1, 2\] selects 3 maps .* all at stride 16.*e\.g\. \[-1\]"):
        Backbone("test_vit", out_indices=[0, 1, 2])  # the pyramid reads one block
    with pytest.raises(ValueError, match=r"out_indices=\[50\] is out of range for 'test_vit'"):
        Backbone("test_vit", out_indices=[50])
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
    with pytest.raises(ValueError, match=r"no tensor name in common with timm's 'test_resnet' \(\d+ tensors"):
        Backbone("test_resnet", pretrained_path=str(other))


def test_pretrained_file_with_pickled_objects_is_refused_clearly(tmp_path):
    import argparse

    path = tmp_path / "with_args.pth"
    torch.save({"model": Backbone("test_resnet").body.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match=r"with_args\.pth \([\d,]+ bytes\) pickles Python objects besides tensors \(argparse\.Namespace\)"):
        Backbone("test_resnet", pretrained_path=str(path))


# ---------------------------------------------------------------------------------------
# The paper backbones: ResNet (and deep-stem variants), Swin at any input size, ViT/DeiT
# through the simple feature pyramid, activation checkpointing per family.


def _meta_shapes(backbone: Backbone, height: int, width: int) -> list[tuple[int, ...]]:
    return [tuple(f.shape) for f in backbone(torch.zeros(1, 3, height, width, device="meta"))]


def _expected(backbone: Backbone, height: int, width: int) -> list[tuple[int, ...]]:
    return [(1, c, -(-height // s), -(-width // s)) for c, s in zip(backbone.channels, backbone.strides)]


@pytest.mark.filterwarnings("ignore:model.backbone.name=:UserWarning")  # the "c" names warn (tested below)
@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet50c", "resnet101c", "resnet50s", "resnet101s"])
def test_resnets_give_strides_4_to_32(name):
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name=name, out_indices=[1, 2, 3, 4]))
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.channels == [256, 512, 1024, 2048]
    assert _meta_shapes(backbone, 512, 384) == _expected(backbone, 512, 384)
    body = backbone.body
    if name[-1] in "cs":
        # Deep stem: three 3x3 convs (c: 32-32-64 as in Bag of Tricks; s: 64-64-128 as
        # detectron2's DeepLab stem, MaskFormer's "R101c") and no average-pool downsample.
        convs = [m for m in body.conv1 if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3)] * 3
        widths = (32, 32, 64) if name.endswith("c") else (64, 64, 128)
        assert tuple(c.out_channels for c in convs) == widths
    else:
        assert body.conv1.kernel_size == (7, 7)
    downsample = body.layer2[0].downsample
    assert isinstance(downsample[0], torch.nn.Conv2d) and downsample[0].stride == (2, 2)


@pytest.mark.parametrize("window", [7, 12])
def test_swin_accepts_any_input_size(window):
    kwargs = dict(embed_dim=24, depths=(1, 2, 1, 2), num_heads=(1, 1, 1, 1), window_size=window)
    backbone = Backbone("swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3], timm_kwargs=kwargs)
    # Window and half-window shift at every stage (Swin's segmentation code), though
    # the stride-32 map of a 224 image is no larger than the window.
    last = backbone.body.layers_3.blocks[1]
    assert last.window_size == (window, window) and last.shift_size == (window // 2, window // 2)
    for height, width in [(64, 96), (100, 70)]:  # a training crop, then a ragged size
        features = backbone(torch.randn(1, 3, height, width))
        assert [tuple(f.shape) for f in features] == _expected(backbone, height, width)


def test_swin_shifted_windows_do_not_wrap_around_the_image():
    # A 16x16 map and window 7: the block pads to 21 before its cyclic shift, so the
    # rows that wrap around (top -> bottom) stay in windows of their own. timm's order
    # (shift, then pad) lets them share windows with the image's bottom rows.
    torch.manual_seed(0)
    block = timm.models.swin_transformer.SwinTransformerBlock(
        dim=8, input_resolution=(16, 16), num_heads=1, window_size=7, shift_size=3, always_partition=True,
        dynamic_mask=True,
    )
    x = torch.randn(1, 16, 16, 8)
    bumped = x.clone()
    bumped[:, 0] += torch.randn(16, 8)  # not constant over channels: norm1 would remove that

    def changed_rows(module):
        with torch.no_grad():
            diff = (module(bumped) - module(x)).abs().amax(dim=(0, 2, 3))
        return set(torch.nonzero(diff > 1e-6).flatten().tolist())

    assert changed_rows(block) & set(range(8, 16))  # timm alone: leaks to the bottom
    use_segmentation_swin_blocks(block)  # what Backbone does to every Swin block
    assert type(block) is SwinBlock
    assert changed_rows(block) <= set(range(0, 7))  # only the window of row 0 and the MLP


def test_swin_outputs_are_layer_normed_nchw():
    backbone = Backbone("swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3], timm_kwargs=TINY_SWIN)
    assert backbone.output_norms is not None and len(backbone.output_norms) == 4
    features = backbone(torch.randn(2, 3, 64, 96))
    for f in features:  # LayerNorm over channels, default affine: mean 0, variance 1
        torch.testing.assert_close(f.mean(dim=1), torch.zeros_like(f[:, 0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name,width", [("swin_base_patch4_window12_384", 128), ("swin_large_patch4_window12_384", 192)]
)
def test_large_swins_on_meta_at_two_sizes(name, width):
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name=name, out_indices=[0, 1, 2, 3]))
    assert backbone.channels == [width, 2 * width, 4 * width, 8 * width]
    assert backbone.body.layers_0.blocks[0].window_size == (12, 12)
    for height, w in [(640, 640), (512, 683)]:
        assert _meta_shapes(backbone, height, w) == _expected(backbone, height, w)


def test_vit_through_simple_feature_pyramid():
    backbone = Backbone("test_vit", out_indices=[-1], pyramid_channels=32)
    assert backbone.pyramid is not None
    assert backbone.strides == [4, 8, 16, 32] and backbone.channels == [32] * 4
    for height, width in [(64, 96), (80, 48), (70, 50)]:
        features = backbone(torch.randn(1, 3, height, width))
        assert [tuple(f.shape) for f in features] == _expected(backbone, height, width)


@pytest.mark.parametrize("name,width", [("vit_large_patch16_384", 1024), ("deit_base_patch16_224", 768)])
def test_paper_vits_on_meta(name, width):
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name=name, out_indices=[-1], pyramid_channels=256))
    first = backbone.pyramid.levels[0]
    assert first[0].in_channels == width and first[3].out_channels == width // 4  # x4: two deconvs
    assert _meta_shapes(backbone, 512, 512) == _expected(backbone, 512, 512)
    assert _meta_shapes(backbone, 640, 480) == _expected(backbone, 640, 480)


def test_simple_feature_pyramid_is_vitdet():
    from model.simple_feature_pyramid import SimpleFeaturePyramid

    pyramid = SimpleFeaturePyramid(64, 32)
    kinds = [[type(m).__name__ for m in level] for level in pyramid.levels]
    assert kinds == [
        ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", "Sequential", "Sequential"],
        ["ConvTranspose2d", "Sequential", "Sequential"],
        ["Sequential", "Sequential"],
        ["MaxPool2d", "Sequential", "Sequential"],
    ]
    outs = pyramid(torch.randn(2, 64, 6, 4))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 24, 16), (2, 32, 12, 8), (2, 32, 6, 4), (2, 32, 3, 2)]


def _block_calls(backbone: Backbone, block_type: type, x: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    """Outputs, the number of blocks, and how often blocks ran in one forward + backward."""
    calls = []
    blocks = [m for m in backbone.modules() if isinstance(m, block_type)]
    handles = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
    features = backbone(x)
    sum(f.square().mean() for f in features).backward()
    for h in handles:
        h.remove()
    return features, len(blocks), len(calls)


@pytest.mark.parametrize(
    "name,kwargs,out_indices,block_path",
    [
        ("swin_tiny_patch4_window7_224", TINY_SWIN, [0, 1, 2, 3], "timm.models.swin_transformer.SwinTransformerBlock"),
        ("test_vit", {}, [-1], "timm.models.vision_transformer.Block"),
    ],
    ids=["swin", "vit"],
)
def test_grad_checkpointing_recomputes_every_block(name, kwargs, out_indices, block_path):
    module_name, _, cls_name = block_path.rpartition(".")
    block_type = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
    torch.manual_seed(0)
    plain = Backbone(name, out_indices=out_indices, timm_kwargs=kwargs, pyramid_channels=16)
    ckpt = Backbone(name, out_indices=out_indices, timm_kwargs=kwargs, pyramid_channels=16, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    torch.manual_seed(1)  # the same stochastic-depth draws (timm's Swin: drop_path_rate 0.1)
    out_plain, n_blocks, plain_calls = _block_calls(plain, block_type, x)
    torch.manual_seed(1)  # checkpointing replays them in the recomputation
    out_ckpt, _, ckpt_calls = _block_calls(ckpt, block_type, x)
    assert plain_calls == n_blocks and ckpt_calls == 2 * n_blocks  # each block re-run in backward
    for a, b in zip(out_plain, out_ckpt):
        torch.testing.assert_close(a, b)
    grads = {k: p.grad for k, p in ckpt.named_parameters()}
    for k, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], msg=k)


def test_vit_pretrained_from_full_classification_model(tmp_path):
    torch.manual_seed(4)
    full = timm.create_model("test_vit", pretrained=False)
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)
    backbone = Backbone("test_vit", out_indices=[-1], pretrained_path=str(path), pyramid_channels=16)
    full_state = full.state_dict()
    for key, value in backbone.body.state_dict().items():  # the wrapper's "model." prefix
        torch.testing.assert_close(value, full_state[key.removeprefix("model.")], msg=key)

    wider = tmp_path / "wider.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, embed_dim=96).state_dict(), wider)
    with pytest.raises(ValueError, match=r"wider\.pth does not fit the backbone: .*shape mismatches"):
        Backbone("test_vit", out_indices=[-1], pretrained_path=str(wider), pyramid_channels=16)


def test_swin_pretrained_in_microsofts_original_layout(tmp_path):
    # The official Swin files put stage i's patch merging under layers.i (timm: layers.i+1)
    # and carry buffers timm recomputes; MaskFormer's instructions download those files.
    torch.manual_seed(5)
    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **TINY_SWIN)
    original = {}
    for key, value in full.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        original[".".join(parts)] = value
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.int64)
    assert "layers.0.downsample.reduction.weight" in original
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": original}, path)
    backbone = Backbone("swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3], pretrained_path=str(path),
                        timm_kwargs=TINY_SWIN)
    full_state = full.state_dict()
    for key, value in backbone.body.state_dict().items():
        source = key if key in full_state else key.replace("_", ".", 1)
        torch.testing.assert_close(value, full_state[source], msg=key)


def test_cnn_batchnorm_is_frozen_in_train_mode():
    # detectron2's FrozenBN (model.backbone.freeze_bn, on by default): a training forward
    # changes no statistic, and the BN affine are not trained.
    torch.manual_seed(6)
    frozen = Backbone("test_resnet").train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    norms = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(not list(m.parameters()) for m in norms)  # affine are buffers now
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    sum(f.square().mean() for f in frozen(torch.randn(2, 3, 64, 64) * 5 + 3)).backward()
    for k, v in frozen.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    # Everything else still trains.
    assert all(p.requires_grad and p.grad is not None for p in frozen.parameters())

    # The switch really switches: live BatchNorm moves its statistics.
    live = Backbone("test_resnet", freeze_bn=False).train()
    bn = next(m for m in live.modules() if isinstance(m, torch.nn.BatchNorm2d))
    mean = bn.running_mean.clone()
    live(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert not torch.equal(bn.running_mean, mean) and bn.weight.requires_grad


def test_frozen_bn_loads_pretrained_batchnorm_weights(tmp_path):
    # A checkpoint of a live-BN ResNet (what ImageNet files are) fills the frozen buffers.
    torch.manual_seed(7)
    live = Backbone("test_resnet", freeze_bn=False)
    for m in live.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "live.pth"
    torch.save(live.body.state_dict(), path)
    frozen = Backbone("test_resnet", pretrained_path=str(path))
    state = frozen.body.state_dict()
    assert "layer1.0.bn1.running_var" in state and not any(k.endswith("num_batches_tracked") for k in state)
    for key, value in state.items():
        torch.testing.assert_close(value, live.body.state_dict()[key], msg=key)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(live.eval()(x), frozen.train()(x)):  # frozen in train() = live in eval()
        torch.testing.assert_close(a, b)


def test_frozen_bn_keeps_bf16_under_autocast():
    # As detectron2's FrozenBN: a bf16 activation stays bf16 (torchvision's would turn
    # every normalised map fp32), with the values of the fp32 computation.
    torch.manual_seed(8)
    backbone = Backbone("test_resnet").train()
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.running_var.uniform_(0.5, 2)
            m.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = backbone(x)
    assert [f.dtype for f in low] == [torch.bfloat16] * 4
    for a, b in zip(low, backbone(x)):
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1)


def test_swin_is_not_touched_by_freeze_bn():
    backbone = Backbone("swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3], timm_kwargs=TINY_SWIN)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def test_timm_c_resnet_name_warns_towards_the_papers_r101c():
    # MaskFormer's R101c = detectron2's DeepLab stem 64-64-128 = timm's resnet101s;
    # timm's resnet101c has a 32-32-64 stem.
    with torch.device("meta"), pytest.warns(UserWarning, match=r"model\.backbone\.name=resnet101s") as record:
        c = Backbone("resnet101c")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Backbone("resnet101s")
    assert [m.out_channels for m in s.body.conv1 if isinstance(m, torch.nn.Conv2d)] == [64, 64, 128]
    assert [m.out_channels for m in c.body.conv1 if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64]


def test_frozen_bn_without_pretrained_weights_logs_one_line(caplog):
    # Frozen at init, a from-scratch ResNet's BN never learns: say so (not for shape-only
    # meta builds, such as describe's, nor when BN is live).
    with caplog.at_level("WARNING", logger="model.backbone"):
        Backbone("test_resnet")
        Backbone("test_resnet", freeze_bn=False)
        with torch.device("meta"):
            Backbone("test_resnet")
    messages = [r.getMessage() for r in caplog.records if "freeze_bn" in r.getMessage()]
    assert len(messages) == 1 and "model.backbone.pretrained_path" in messages[0] and "\n" not in messages[0]
