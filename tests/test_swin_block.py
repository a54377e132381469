"""model.swin_block.SwinBlock computes what timm's Swin block computes on a map padded
to the window before the shift (the pad-first rule), values and gradients, while
projecting only the map's tokens."""

import ops.torchvision_fix  # noqa: F401

# isort: split
import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch.overrides import TorchFunctionMode

from model.swin_block import SwinBlock, use_segmentation_swin_blocks


def _pad_first_reference(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's own block, on the normed map zero-padded to the window before its roll."""
    height, width = x.shape[1], x.shape[2]
    pad_h, pad_w = -height % block.window_size[0], -width % block.window_size[1]
    normed = F.pad(block.norm1(x), (0, 0, 0, pad_w, 0, pad_h))
    attended = SwinTransformerBlock._attn(block, normed)[:, :height, :width]
    x = x + block.drop_path1(attended)
    batch, _, _, channels = x.shape
    flat = x.reshape(batch, -1, channels)
    return (flat + block.drop_path2(block.mlp(block.norm2(flat)))).reshape(x.shape)


@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize("dynamic_mask", [False, True])
@pytest.mark.parametrize(
    "size,shift",
    [((14, 14), 0), ((14, 14), 3), ((16, 16), 3), ((10, 19), 3), ((8, 8), 0), ((5, 9), 3)],
)
def test_matches_timm_on_the_pad_first_map(size, shift, dynamic_mask, fused_attn):
    torch.manual_seed(0)
    padded = tuple(-(-s // 7) * 7 for s in size)
    block = SwinTransformerBlock(
        dim=16, input_resolution=padded, num_heads=2, window_size=7, shift_size=shift, always_partition=True,
        dynamic_mask=dynamic_mask,
    ).double()
    with torch.no_grad():  # a non-zero qkv bias, so padding tokens are not zero after it
        block.attn.qkv.bias.normal_()
        block.attn.relative_position_bias_table.normal_()
    block.attn.fused_attn = fused_attn
    x = torch.randn(2, *size, 16, dtype=torch.float64, requires_grad=True)

    expected = _pad_first_reference(block, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *block.parameters()])
    use_segmentation_swin_blocks(block)
    assert type(block) is SwinBlock
    actual = block(x)
    actual_grads = torch.autograd.grad(actual.square().sum(), [x, *block.parameters()])

    torch.testing.assert_close(actual, expected)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want)


class _LinearRows(TorchFunctionMode):
    """Records how many rows each weight of interest is multiplied with by F.linear."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {id(w): name for name, w in weights.items()}
        self.rows: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and id(args[1]) in self.names:
            self.rows[self.names[id(args[1])]] = args[0].shape[:-1].numel()
        return func(*args, **kwargs)


class _RolledDtypes(TorchFunctionMode):
    """Records the dtype of every tensor torch.roll shifts (the block's qkv, then its output)."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.roll:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_padding_is_not_projected():
    # A 16x16 map and window 7: the windows cover 21x21 = 441 tokens, the map 256. The
    # qkv and output projections see only the map's 256 tokens per image.
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=16, input_resolution=(21, 21), num_heads=2, window_size=7, shift_size=3,
                                 always_partition=True)
    use_segmentation_swin_blocks(block)
    with _LinearRows({"qkv": block.attn.qkv.weight, "proj": block.attn.proj.weight}) as recorded:
        block(torch.randn(2, 16, 16, 16))
    assert recorded.rows == {"qkv": 2 * 16 * 16, "proj": 2 * 16 * 16}


def test_bf16_autocast_matches_timm_within_bf16_precision():
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=32, input_resolution=(21, 21), num_heads=2, window_size=7, shift_size=3,
                                 always_partition=True, dynamic_mask=True)
    x = torch.randn(2, 16, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _pad_first_reference(block, x)
        use_segmentation_swin_blocks(block)
        actual = block(x)
        with _RolledDtypes() as rolled:
            block(x)
    assert actual.dtype == expected.dtype
    assert rolled.dtypes == [torch.bfloat16, torch.bfloat16]  # qkv and output: no fp32 detour at the padding
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-2, rtol=2e-2)
