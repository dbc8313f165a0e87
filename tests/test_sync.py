"""mabn.SyncBatchNorm2d: nn.BatchNorm2d when not distributed, whole-batch BN over 2 gloo ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mabn

D = torch.float64
C = 3


def _batch():
    """A float64 batch (8 images, channel offsets and scales), an upstream gradient, affine params."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 5, 4, generator=g, dtype=D) * torch.tensor([1.0, 3.0, 0.5], dtype=D).view(1, C, 1, 1) + 2.0
    u = torch.randn(8, C, 5, 4, generator=g, dtype=D)
    w, b = torch.rand(C, generator=g, dtype=D) + 0.5, torch.randn(C, generator=g, dtype=D)
    return x, u, w, b


def _layer(cls, w, b, momentum):
    layer = cls(C, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def _steps(layer, x, u, steps=2):
    """``steps`` training forwards/backwards on x; the last output and the gradients."""
    for _ in range(steps):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        out = layer(xi)
        (out * u).sum().backward()
    return out.detach(), xi.grad, layer.weight.grad, layer.bias.grad


def _stats(layer):
    return layer.running_mean, layer.running_var, layer.num_batches_tracked


@pytest.mark.parametrize("momentum", [0.1, None])
def test_not_distributed_it_is_batchnorm2d(momentum):
    assert not dist.is_initialized()
    x, u, w, b = _batch()
    sync, ref = _layer(mabn.SyncBatchNorm2d, w, b, momentum), _layer(nn.BatchNorm2d, w, b, momentum)
    for got, want in zip(_steps(sync, x, u) + _stats(sync), _steps(ref, x, u) + _stats(ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    sync.eval()
    want = nn.functional.batch_norm(x, ref.running_mean, ref.running_var, w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(sync(x), want, rtol=1e-12, atol=1e-12)


def test_build_norm_and_conversion_give_it():
    layer = mabn.build_norm(4, layer="syncbn", alpha=0.8)
    assert type(layer) is mabn.SyncBatchNorm2d and layer.momentum == pytest.approx(0.2)
    assert isinstance(layer, nn.BatchNorm2d) and not isinstance(layer, nn.SyncBatchNorm) and mabn.is_batchnorm_2d(layer)
    bn = nn.BatchNorm2d(4)
    model = mabn.SyncBatchNorm2d.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), bn))
    assert type(model[1]) is mabn.SyncBatchNorm2d and model[1].weight is bn.weight
    assert set(model[1].state_dict()) == set(bn.state_dict())


def _rank(rank, init, out_dir, momentum):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        x, u, w, b = _batch()
        half = slice(4 * rank, 4 * rank + 4)
        layer = _layer(mabn.SyncBatchNorm2d, w, b, momentum)
        results = _steps(layer, x[half], u[half]) + _stats(layer)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_two_gloo_ranks_equal_one_batchnorm_over_the_whole_batch(tmp_path, momentum):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(init, str(tmp_path), momentum), nprocs=2, join=True)
    x, u, w, b = _batch()
    ref = _layer(nn.BatchNorm2d, w, b, momentum)
    out, dx, dw, db = _steps(ref, x, u)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, (o, g, gw, gb, mean, var, nbt) in enumerate(ranks):
        half = slice(4 * r, 4 * r + 4)
        torch.testing.assert_close(o, out[half], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, dx[half], rtol=1e-10, atol=1e-10)
        for got, want in zip((mean, var, nbt), _stats(ref)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ranks[0][2] + ranks[1][2], dw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ranks[0][3] + ranks[1][3], db, rtol=1e-10, atol=1e-10)
