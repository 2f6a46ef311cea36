""" DDP with 2 gloo processes on CPU: per-rank Gram by default, global-batch Gram with sync_gram=True. """
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from timm_tract import apply_tract

WORLD = 2


def _net(sync_gram: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 4)).double()
    return apply_tract(net, tract_lambda=0.1, sync_gram=sync_gram)


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 12, 12, generator=gen, dtype=torch.float64) * 2 + 0.3
    y = torch.randint(0, 4, (8,), generator=gen)
    return x, y


def _step_grad(model: nn.Module, x, y) -> torch.Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    first = model.module[0] if isinstance(model, DistributedDataParallel) else model[0]
    return first.weight.grad.detach().clone()


def _worker(rank: int, init_file: str, out_dir: str, sync_gram: bool) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_net(sync_gram))
        x, y = _batch()
        per_rank = x.shape[0] // WORLD
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        grad = _step_grad(model, x[sl], y[sl])
        torch.save(grad, os.path.join(out_dir, f'grad{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _run_ddp(tmp_path, sync_gram: bool):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path), sync_gram), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f'grad{r}.pt') for r in range(WORLD)]
    assert torch.equal(grads[0], grads[1])  # DDP all-reduced the (already preconditioned) gradients
    return grads[0]


@pytest.mark.slow
def test_sync_gram_two_processes_equal_single_process_on_concatenated_batch(tmp_path):
    ddp_grad = _run_ddp(tmp_path, sync_gram=True)
    x, y = _batch()
    single = _step_grad(_net(sync_gram=True), x, y)  # not distributed: sync is a no-op
    assert torch.allclose(ddp_grad, single, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_default_per_rank_gram_is_the_mean_of_per_rank_tract_gradients(tmp_path):
    ddp_grad = _run_ddp(tmp_path, sync_gram=False)
    x, y = _batch()
    halves = [_step_grad(_net(False), x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i in range(WORLD)]
    assert torch.allclose(ddp_grad, sum(halves) / WORLD, rtol=1e-10, atol=1e-13)
    # ...which is not the global-batch TrAct gradient (the paper's per-replica behaviour)
    single = _step_grad(_net(False), x, y)
    assert not torch.allclose(ddp_grad, single, rtol=1e-4, atol=0)
