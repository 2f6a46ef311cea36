""" CUDA-only checks (marker `cuda`, skipped without a GPU; run by scripts/gpu_check.py): no host-device sync in a
training step, CUDA-graph capture, inductor, fp16 + GradScaler, bf16 + channels_last against float64, parity with
the official torch-tract on CUDA, a 1-process NCCL `sync_gram` step, the device-sized Gram budget. """
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_tract import TrActConv2d, apply_tract
from timm_tract import functional as TF

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


@pytest.fixture(autouse=True)
def full_fp32():
    """cuDNN convolutions default to TF32 (10-bit mantissa): off, so float32 results can be held to float32 bounds."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _net(tract=True, stem=(3, 16, 7, 2, 3), bn=True):
    torch.manual_seed(0)
    conv = (TrActConv2d if tract else nn.Conv2d)(*stem[:3], stride=stem[3], padding=stem[4], bias=False)
    norm = nn.BatchNorm2d(stem[1]) if bn else nn.Identity()
    return nn.Sequential(conv, norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(stem[1], 10)).cuda()


def _data(batch=8, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen) * 2 + 0.5
    return x.cuda(), torch.randint(0, 10, (batch,), generator=gen).cuda()


def _step(model, opt, x, y, scaler=None, amp_dtype=None):
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def _oracle(x, gy, weight_shape, tract_lambda, stride, padding):
    """float64 TrAct conv gradient on CPU by explicit unfold and inverse."""
    x, gy = x.double().cpu(), gy.double().cpu()
    cols = F.unfold(x, weight_shape[2:], padding=padding, stride=stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    grad_out = gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
    a = rows.T @ rows / rows.shape[0] + tract_lambda * torch.eye(rows.shape[1], dtype=torch.float64)
    return (grad_out.T @ rows @ torch.linalg.inv(a)).reshape(weight_shape)


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize('stem,batch,size', [
    ((3, 16, 7, 2, 3), 8, 12),  # shifted Gram, n×n system
    ((3, 16, 7, 2, 3), 8, 64),  # spectral Gram (FFTs, batched products, sparse term combination)
    ((3, 16, 4, 4, 0), 8, 32),  # patch embed: unfold Gram
    ((3, 16, 16, 16, 0), 1, 32),  # N = 4 < n = 768: the Woodbury system
])
def test_no_host_device_sync_in_a_training_step(stem, batch, size):
    model = _net(stem=stem)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x, y = _data(batch, size)
    _step(model, opt, x, y)  # warm-up: lazy initialization (cuBLAS/cuSOLVER handles) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(2):
            _step(model, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize('size,offset', [(12, 0.5), (64, 0.5), (64, 200.0)])  # shifted, spectral; far from mean 0
def test_cuda_result_matches_float64_reference(size, offset):
    torch.manual_seed(0)
    layer = TrActConv2d(3, 16, 7, stride=2, padding=3).cuda()
    x = (torch.randn(4, 3, size, size) * 2 + offset).cuda()
    gy = torch.randn(4, 16, size // 2, size // 2).cuda()
    (layer(x) * gy).sum().backward()
    assert _rel(layer.weight.grad, _oracle(x, gy, layer.weight.shape, 0.1, 2, 3)) <= 1e-4


def test_parity_with_official_on_cuda():
    torch_tract = pytest.importorskip('torch_tract')
    torch.manual_seed(0)
    ours = TrActConv2d(3, 16, 7, stride=2, padding=3).cuda()
    ref = torch_tract.TrAct(nn.Conv2d(3, 16, 7, 2, 3), l=0.1).cuda()
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(4, 3, 64, 64) * 2 + 0.5).cuda()
    gy = torch.randn(4, 16, 32, 32).cuda()
    for layer in (ours, ref):
        (layer(x) * gy).sum().backward()
    assert torch.equal(ours(x), ref(x))
    assert _rel(ours.weight.grad, ref.weight.grad) <= 1e-4


def _first_grads(model, x, y, steps=3, first=None):
    grads = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads.append((first or model[0]).weight.grad.detach().clone())
    return grads


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_torch_compile_gradients_equal_eager(mode):
    """Inductor, and CUDA-graph capture of the step (`reduce-overhead`), give eager's TrAct gradient."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = _net(bn=False)  # no BatchNorm buffers mutated in the graph: a skipped capture is TrAct's doing
    x, y = _data()
    eager = _first_grads(model, x, y, steps=1)[0]
    compiled = torch.compile(model, mode=mode)
    for grad in _first_grads(compiled, x, y, steps=3, first=model[0]):
        assert torch.allclose(grad, eager, rtol=1e-4, atol=1e-5)
    if mode == 'reduce-overhead':
        assert not counters['inductor'].get('cudagraph_skips'), dict(counters['inductor'])


def test_fp16_grad_scaler_skips_overflow_steps_like_plain():
    """A step whose scaled fp16 gradients overflow is skipped for the TrAct model exactly as for the plain one (no
    error from TrAct), and the following steps with a sane scale train both."""
    tract, plain = _net(), _net(tract=False)
    plain.load_state_dict(tract.state_dict())
    x, y = _data()
    results = []
    for model in (tract, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler('cuda', init_scale=2.0 ** 40)
        before = [p.detach().clone() for p in model.parameters()]
        _step(model, opt, x, y, scaler, torch.float16)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        scale_after = scaler.get_scale()
        for _ in range(40):  # the scaler backs off until steps go through
            _step(model, opt, x, y, scaler, torch.float16)
        moved = not torch.equal(before[0], model[0].weight)
        results.append((unchanged, scale_after, moved, scaler.get_scale()))
    assert results[0][0] and results[1][0]  # the overflow step was skipped
    assert results[0][1] == results[1][1] < 2.0 ** 40
    assert results[0][2] and results[1][2]
    assert all(torch.isfinite(p).all() for p in tract.parameters())


def test_bf16_autocast_channels_last_against_float64():
    torch.manual_seed(0)
    layer = TrActConv2d(3, 16, 7, stride=2, padding=3).cuda().to(memory_format=torch.channels_last)
    plain = nn.Conv2d(3, 16, 7, 2, 3).cuda().to(memory_format=torch.channels_last)
    plain.load_state_dict(layer.state_dict())
    x = (torch.randn(8, 3, 32, 32) * 2 + 0.5).cuda().to(memory_format=torch.channels_last)
    gy = torch.randn(8, 16, 16, 16).cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        (layer(x).float() * gy).sum().backward()
        (plain(x).float() * gy).sum().backward()
    ref = _oracle(x, gy, layer.weight.shape, 0.1, 2, 3)
    assert layer.weight.grad.dtype == torch.float32
    err = _rel(layer.weight.grad, ref)
    assert err <= 1.5e-2
    assert _rel(plain.weight.grad, ref) > 20 * err


def test_nccl_one_process_sync_gram(tmp_path):
    """A 1-process NCCL group runs the all-reduce of XᵀX and N: same gradient as without a group, no host sync."""
    import torch.distributed as dist
    if not dist.is_nccl_available():
        pytest.skip('NCCL not available')
    x, y = _data(16, 32)
    single = _first_grads(_net(), x, y, steps=1)[0]
    dist.init_process_group('nccl', init_method=f'file://{tmp_path / "init"}', rank=0, world_size=1,
                            device_id=torch.device('cuda', torch.cuda.current_device()))
    try:
        model = apply_tract(_net(tract=False), sync_gram=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, foreach=True)
        _step(model, opt, x, y)  # warm-up: communicator set-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            _step(model, opt, x, y)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.allclose(model[0].weight.grad, single, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_device_sized_gram_budget(monkeypatch):
    monkeypatch.delenv(TF.GRAM_CHUNK_ENV, raising=False)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    budget = TF.gram_chunk_bytes(torch.device('cuda', torch.cuda.current_device()))
    assert budget == min(256 << 20, max(64 << 20, int(total / 512)))
    per_image = 42 * 115 * 112 * 4  # ResNet stem at 224 px: vertical-unfold bytes of one image (fp32)
    assert math.ceil(256 / (budget // per_image)) <= 8  # B=256 in a handful of chunks
