"""BatchNorm running statistics are averaged over the ranks before validation and
checkpoints (``launcher.train_loop.share_batchnorm_statistics``): two real gloo ranks."""

import multiprocessing
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from launcher.train_loop import share_batchnorm_statistics


def _model(rank: int) -> nn.Module:
    """Trainable BatchNorm whose statistics depend on the rank, and a frozen one (whose
    statistics differ here too, so that averaging them would show)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), FrozenBatchNorm2d(4))
    model[1].running_mean.copy_(torch.arange(4.0) + 10 * rank)
    model[1].running_var.copy_(torch.full((4,), 1.0 + rank))
    model[2].running_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.7]) + rank)
    return model


def _rank(rank: int, store_path: str, results) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
        model = _model(rank)
        share_batchnorm_statistics(model, world_size=2)
        results.put((rank, {k: v.tolist() for k, v in model.named_buffers()}))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, traceback.format_exc()))


def test_two_ranks_end_with_the_mean_of_their_statistics(tmp_path):
    # fork: the ranks reuse this process's imports (a spawned rank re-imports torch, ~10 s
    # on the CI machine); the collectives move a few floats, no intra-op threads involved.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, str(tmp_path / "store"), results)) for r in (0, 1)]
    for process in ranks:
        process.start()
    states = dict(results.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
    for rank, state in states.items():
        assert isinstance(state, dict), f"rank {rank}: {state}"
        assert state["1.running_mean"] == [5.0, 6.0, 7.0, 8.0]  # (i + (i + 10)) / 2
        assert state["1.running_var"] == [1.5] * 4
        assert state["2.running_mean"] == _model(rank)[2].running_mean.tolist()  # frozen: untouched
    assert state["1.num_batches_tracked"] == 0


def test_one_rank_is_left_alone_without_a_process_group():
    model = _model(rank=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    share_batchnorm_statistics(model, world_size=1)  # no process group here: must not reach for one
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
