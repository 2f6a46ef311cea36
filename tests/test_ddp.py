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


# --- few rows per rank (N_rank < n), uneven across ranks, sync_gram: the global n×n Gram, not per-rank Woodbury ---

def _few_rows_data(kind: str, rank: int):
    """Rank 0 and rank 1 get different numbers of rows, each fewer than n (conv: n = 27; linear: n = 16)."""
    gen = torch.Generator().manual_seed(10 + rank)
    if kind == 'conv':  # 3×3/2 conv, padding 1, 4×4 images: 4 rows per image; rank 0: 1 image, rank 1: 2 images
        x = torch.randn(1 + rank, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 0.5
        gy = torch.randn(1 + rank, 5, 2, 2, generator=gen, dtype=torch.float64)
    else:  # rank 0: 3 rows, rank 1: 2×3 rows
        x = torch.randn(1 + rank, 3, 16, generator=gen, dtype=torch.float64) * 2 + 0.5
        gy = torch.randn(1 + rank, 3, 5, generator=gen, dtype=torch.float64)
    return x, gy


def _few_rows_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, stride=2, padding=1) if kind == 'conv' else nn.Linear(16, 5)
    return apply_tract(nn.Sequential(layer.double()), tract_lambda=0.1, sync_gram=True)


def _few_rows_worker(rank: int, init_file: str, out_dir: str, kind: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_few_rows_layer(kind))
        x, gy = _few_rows_data(kind, rank)
        (model(x) * gy).sum().backward()
        torch.save(model.module[0].weight.grad.detach().clone(), os.path.join(out_dir, f'grad{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _oracle_global(kind: str) -> torch.Tensor:
    """float64 TrAct gradient from the concatenated batch's rows: ½ Σ_r G_rᵀX_r (XᵀX/N + λI)⁻¹ (DDP averages)."""
    rows, grads = [], []
    for rank in range(WORLD):
        x, gy = _few_rows_data(kind, rank)
        if kind == 'conv':
            cols = nn.functional.unfold(x, 3, padding=1, stride=2)
            rows.append(cols.transpose(1, 2).reshape(-1, 27))
            grads.append(gy.permute(0, 2, 3, 1).reshape(-1, 5))
        else:
            rows.append(x.reshape(-1, 16))
            grads.append(gy.reshape(-1, 5))
    assert all(r.shape[0] < r.shape[1] for r in rows) and rows[0].shape[0] != rows[1].shape[0]
    x, g = torch.cat(rows), torch.cat(grads)
    a = x.T @ x / x.shape[0] + 0.1 * torch.eye(x.shape[1], dtype=torch.float64)
    return (g.T @ x @ torch.linalg.inv(a)) / WORLD


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['conv', 'linear'])
def test_sync_gram_with_few_uneven_rows_per_rank_matches_float64_global_reference(tmp_path, kind):
    mp.spawn(_few_rows_worker, args=(str(tmp_path / 'init'), str(tmp_path), kind), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f'grad{r}.pt') for r in range(WORLD)]
    assert torch.equal(grads[0], grads[1])
    expected = _oracle_global(kind).reshape(grads[0].shape)
    assert ((grads[0] - expected).norm() / expected.norm()) <= 1e-10


# --- sync_gram in float32 with one rank's batch far from zero mean: every rank's Gram is the same kind ---

def _mixed_mean_data(rank: int):
    """A standardized batch on rank 0, one far from zero mean on rank 1 (the CPU centers only that one when alone)."""
    gen = torch.Generator().manual_seed(20 + rank)
    x = torch.randn(2, 3, 16, 16, generator=gen) + 3.0 * rank
    return x, torch.randn(2, 4, 8, 8, generator=gen)


def _mixed_mean_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(apply_tract(nn.Sequential(nn.Conv2d(3, 4, 7, stride=2, padding=3)),
                                                    sync_gram=True))
        x, gy = _mixed_mean_data(rank)
        (model(x) * gy).sum().backward()
        torch.save(model.module[0].weight.grad.detach().clone(), os.path.join(out_dir, f'grad{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_gram_float32_with_ranks_on_both_sides_of_the_centering_rule(tmp_path):
    """float32, rank 1's batch far from zero mean, rank 0's not: under sync_gram both center (a local decision would
    all-reduce a float64 Gram against a float32 one: gloo aborts), and the gradient is the global one."""
    mp.spawn(_mixed_mean_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f'grad{r}.pt') for r in range(WORLD)]
    assert torch.equal(grads[0], grads[1])
    rows, outs = [], []
    for rank in range(WORLD):
        x, gy = _mixed_mean_data(rank)
        rows.append(nn.functional.unfold(x.double(), 7, padding=3, stride=2).transpose(1, 2).reshape(-1, 147))
        outs.append(gy.double().permute(0, 2, 3, 1).reshape(-1, 4))
    x, g = torch.cat(rows), torch.cat(outs)
    a = x.T @ x / x.shape[0] + 0.1 * torch.eye(147, dtype=torch.float64)
    expected = ((g.T @ x @ torch.linalg.inv(a)) / WORLD).reshape(grads[0].shape)
    assert ((grads[0].double() - expected).norm() / expected.norm()) <= 1e-4
