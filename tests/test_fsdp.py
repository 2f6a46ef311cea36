""" FSDP2 (`fully_shard`) with 2 gloo processes on CPU: `create_optimizer_v2(model, 'tract-*')` after sharding the
blocks, then the root (ResNet and ViT, with and without `tract_sync_gram`), checked in float64 against the DDP /
full-batch reference computed here in one process from the TrAct formula. """
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from _stack_helpers import first_layer, patch_rows, random_batch, tiny_model, tract_formula

WORLD = 2
LR = 0.1
CASES = [('resnet10t', False), ('resnet10t', True), ('vit_tiny_patch16_224', False), ('vit_tiny_patch16_224', True)]


def _model(arch: str, device=None) -> nn.Module:
    narrow = {'img_size': 32, 'depth': 2, 'embed_dim': 64, 'num_heads': 2} if arch.startswith('vit') else \
        {'stem_width': 16, 'channels': (16, 32, 64, 64)}
    return tiny_model(arch, device=device, **narrow).double()


def _blocks(model: nn.Module):
    if hasattr(model, 'blocks'):
        return list(model.blocks)
    return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


def _batch(rank: int):
    """Rank `rank`'s half of one batch of 4 images (32 px, float64)."""
    x, y = random_batch(1)
    sl = slice(rank * 2, rank * 2 + 2)
    return x[sl], y[sl]


def _sharded_step(arch: str, sync_gram: bool, rank: int, mesh, stem_alone: bool = False):
    """One tract-momentum step after fully_shard; `stem_alone`: apply_tract first, and the stem sharded on its own."""
    from timm.optim import create_optimizer_v2
    from torch.distributed.fsdp import fully_shard
    from timm_tract import apply_tract
    model = _model(arch)
    if stem_alone:
        apply_tract(model, sync_gram=sync_gram)
        fully_shard(first_layer(model), mesh=mesh)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = create_optimizer_v2(model, 'tract-momentum', lr=LR, momentum=0.9, tract_sync_gram=sync_gram)
    x, y = _batch(rank)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    opt.step()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    stem = first_layer(model)
    return {'grads': grads, 'weights': weights, 'stem': (type(stem).__name__, stem.sync_gram)}


def _stem_sharded_alone(mesh) -> dict:
    from timm.optim import create_optimizer_v2
    from torch.distributed.fsdp import fully_shard
    from timm_tract.errors import TrActArgumentError
    model = _model('resnet10t')
    fully_shard(model.conv1[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        create_optimizer_v2(model, 'tract-sgd', lr=LR)
    except TrActArgumentError as e:
        return {'error': str(e), 'stem': type(model.conv1[0]).__name__}
    return {'error': None, 'stem': type(model.conv1[0]).__name__}


def _built_on_meta(mesh) -> dict:
    """FSDP2's usual start: the model on the meta device, sharded, then materialized with to_empty()."""
    from timm.optim import create_optimizer_v2
    from torch.distributed.fsdp import fully_shard
    model = _model('resnet10t', device='meta')
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device='cpu')
    opt = create_optimizer_v2(model, 'tract-sgd', lr=LR, tract_sync_gram=True)
    stem = first_layer(model)
    return {'stem': (type(stem).__name__, stem.sync_gram),
            'trained': any(p is stem.weight for g in opt.param_groups for p in g['params'])}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import timm_tract  # noqa: F401  (registers the tract-* optimizers in this process)
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh('cpu', (WORLD,))
        out = {case: _sharded_step(*case, rank, mesh) for case in CASES}
        out['stem_alone'] = _stem_sharded_alone(mesh)
        out['apply_first'] = _sharded_step('resnet10t', False, rank, mesh, stem_alone=True)
        out['meta'] = _built_on_meta(mesh)
        if rank == 0:
            torch.save(out, os.path.join(out_dir, 'fsdp.pt'))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def fsdp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fsdp')
    mp.spawn(_worker, args=(str(tmp / 'init'), str(tmp)), nprocs=WORLD, join=True)
    return torch.load(tmp / 'fsdp.pt', weights_only=False)


@functools.lru_cache(maxsize=None)
def _per_rank_plain(arch: str):
    """Each rank's plain gradients and first-layer rows, the initial weights and the first layer's weight name."""
    plain, rows = [], []
    for rank in range(WORLD):
        model = _model(arch)
        x, y = _batch(rank)
        nn.functional.cross_entropy(model(x), y).backward()
        plain.append({n: p.grad.clone() for n, p in model.named_parameters()})
        rows.append(patch_rows(first_layer(model), x))
    init = {n: p.detach() for n, p in _model(arch).named_parameters()}
    return plain, rows, init, model.pretrained_cfg['first_conv'] + '.weight'


def _reference(arch: str, sync_gram: bool):
    """DDP semantics in one process: every gradient is the mean of the ranks' gradients; the first layer's is the
    mean of per-rank TrAct gradients, or with sync_gram the mean plain gradient preconditioned with the full batch."""
    plain, rows, init, stem = _per_rank_plain(arch)
    grads = {n: sum(g[n] for g in plain) / WORLD for n in plain[0]}
    if sync_gram:
        grads[stem] = tract_formula(grads[stem], torch.cat(rows))
    else:
        grads[stem] = sum(tract_formula(g[stem], r) for g, r in zip(plain, rows)) / WORLD
    weights = {n: init[n] - LR * g for n, g in grads.items()}  # first momentum step: the gradient itself
    return grads, weights, stem


def _assert_matches_reference(got: dict, arch: str, sync_gram: bool) -> None:
    grads, weights, _ = _reference(arch, sync_gram)
    assert got['grads'].keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(got['grads'][name], grads[name], rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(got['weights'][name], weights[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('arch,sync_gram', CASES, ids=[f'{a}-sync{int(s)}' for a, s in CASES])
def test_tract_optimizer_after_fully_shard_matches_the_ddp_reference(fsdp_results, arch, sync_gram):
    got = fsdp_results[(arch, sync_gram)]
    assert got['stem'] == ('TrActConv2d', sync_gram)
    _assert_matches_reference(got, arch, sync_gram)
    # the reference is neither the plain gradient nor the one of the other sync_gram setting
    grads, _, stem = _reference(arch, sync_gram)
    plain = sum(g[stem] for g in _per_rank_plain(arch)[0]) / WORLD
    other, _, _ = _reference(arch, not sync_gram)
    assert not torch.allclose(grads[stem], plain, rtol=1e-4, atol=0)
    assert not torch.allclose(grads[stem], other[stem], rtol=1e-4, atol=0)


@pytest.mark.slow
def test_a_stem_sharded_on_its_own_is_refused(fsdp_results):
    got = fsdp_results['stem_alone']
    assert got['error'] and 'sharded on its own' in got['error']
    assert 'apply_tract(model) before fully_shard' in got['error']
    assert got['stem'] == 'FSDPConv2d'  # unchanged: not turned into a TrAct layer


@pytest.mark.slow
@pytest.mark.usefixtures('one_thread')
def test_apply_tract_before_sharding_the_stem_on_its_own(fsdp_results):
    """The way out the refusal names: apply_tract, then fully_shard(stem); tract-* keeps that TrAct layer."""
    got = fsdp_results['apply_first']
    assert got['stem'] == ('FSDPTrActConv2d', False)
    _assert_matches_reference(got, 'resnet10t', False)


@pytest.mark.slow
def test_model_built_on_meta_sharded_then_materialized(fsdp_results):
    assert fsdp_results['meta'] == {'stem': ('TrActConv2d', True), 'trained': True}
