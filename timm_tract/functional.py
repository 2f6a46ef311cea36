""" TrAct functional core: the one autograd op, the patch Gram matrix and the solve.

TrAct (Petersen, Borgelt, Ermon, "TrAct: Making First-layer Pre-Activations Trainable",
NeurIPS 2024, arXiv:2410.23970) replaces the weight gradient of a vision model's first layer by

    grad_W = Gᵀ X (XᵀX / N + λ I_n)⁻¹

with X (N, n) the unfolded input patches (one row per output position of every image, n = C_in/groups·kh·kw),
G (N, m) the ordinary gradient w.r.t. the layer output and λ > 0. Forward, bias gradient and input gradient
are the ordinary ones.

Implementation: the layer's forward is the native `F.conv2d` / `F.linear`, called with the weight passed through
`_TrActWeightGrad`, an identity in forward whose backward receives the ordinary weight gradient P = GᵀX (computed by
the native kernel) and returns P (XᵀX/N + λI)⁻¹. XᵀX is accumulated in bounded chunks from the input the
layer saves anyway (never the whole unfolded input), and the system is solved with a Cholesky factorization
(float32, float64 for float64 inputs). For N < n the equivalent Woodbury form solves an N×N system instead.

Chunk budget: the bytes of patches materialized at once (`gram_chunk_bytes`). The CPU keeps a cache-sized 8 MiB, so
the extra memory is small and fixed; accelerators (CUDA, ...) take 1/512 of the device memory, bounded to
64-256 MiB, so a 224 px ResNet-50 stem at B=256 is a handful of chunks and the kernel launches of one backward hardly
grow with the batch. Set it with `set_gram_chunk_bytes` or the environment variable `TIMM_TRACT_GRAM_CHUNK_MB`
(read at every backward).

Positive-definiteness check: on CPU a failed factorization raises `NotPositiveDefiniteError` saying whether the input
held NaN/Inf or a finite scale too large for the Gram; on accelerators the same check is a device-side assert
(`torch._assert_async`), so a training step never waits for the device.
"""
import contextlib
import functools
import itertools
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import NotPositiveDefiniteError, TrActArgumentError, TrActTypeError

__all__ = ['tract_conv2d', 'tract_linear', 'tract_weight', 'patch_gram', 'ConvGeometry', 'conv_geometry',
           'tract_precondition', 'check_lambda', 'check_lambda_mode', 'gram_chunk_bytes', 'set_gram_chunk_bytes',
           'GRAM_CHUNK_ENV', 'DEFAULT_LAMBDA', 'DEFAULT_LAMBDA_MODE', 'LAMBDA_MODES']

DEFAULT_LAMBDA = 0.1
# 'absolute': the paper's system XᵀX/N + λI. 'relative': XᵀX/N + λ·s·I with s = tr(XᵀX/N)/n, the mean second moment of
# the patch entries (per group), so λ is independent of the input's units.
LAMBDA_MODES = ('absolute', 'relative')
DEFAULT_LAMBDA_MODE = 'absolute'

GRAM_CHUNK_ENV = 'TIMM_TRACT_GRAM_CHUNK_MB'
# CPU: 8 MiB of patches per chunk (about one 224 px ResNet-stem image unfolded, 147 × 112² in fp32), cache-sized.
_CPU_CHUNK_BYTES = 8 << 20
# accelerators: this fraction of the device memory, within these bounds (unknown memory: the lower bound)
_ACCEL_CHUNK_FRACTION = 1 / 512
_ACCEL_CHUNK_BOUNDS = (64 << 20, 256 << 20)
_chunk_bytes_setting: Optional[int] = None
_SYMMETRIC_MIN_N = 384

_IntPair = Union[int, Tuple[int, int]]


def _pair(v: _IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# λ must stay a normal, finite float32 (the system of float32 inputs may be float32)
_FLOAT32_LAMBDA_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def check_lambda(tract_lambda: Union[float, torch.Tensor]) -> float:
    """Return `tract_lambda` as a Python float.

    Accepts any real number (int, float, numpy scalars, a one-element real tensor); raises `TrActTypeError` (a
    TypeError) for other types, bool included, and `TrActArgumentError` (a ValueError) unless it is finite, > 0 and
    within the normal float32 range (about 1.2e-38 to 3.4e38: 1e300 would be inf in float32).
    """
    value = tract_lambda
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool \
            and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrActTypeError(
            f'tract_lambda must be a real number > 0, got {type(tract_lambda).__name__} {tract_lambda!r}. '
            f'Pass a float such as 0.1 (the paper default).')
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise TrActArgumentError(
            f'tract_lambda must be finite and > 0, got {tract_lambda!r}. '
            f'Use the paper default 0.1 (0.05 for short runs, 0.2 for long runs).')
    if not _FLOAT32_LAMBDA_RANGE[0] <= value <= _FLOAT32_LAMBDA_RANGE[1]:
        raise TrActArgumentError(
            f'tract_lambda={value:g} is outside what a float32 system can hold ({_FLOAT32_LAMBDA_RANGE[0]:g} to '
            f'{_FLOAT32_LAMBDA_RANGE[1]:g}: it would become 0 or inf). Use the paper default 0.1 (0.05 for short '
            f'runs, 0.2 for long runs).')
    return value


def check_lambda_mode(tract_lambda_mode: str) -> str:
    """Return `tract_lambda_mode` ('absolute' or 'relative'); `TrActTypeError` for a non-str, `TrActArgumentError`
    for another string.

    'absolute' (default, the paper): the system is XᵀX/N + λI. 'relative': XᵀX/N + λ·s·I with s = tr(XᵀX/N)/n, the
    mean second moment of the patch entries (per group), so scaling the input by c > 0 leaves the update X·ΔW
    unchanged; for standardized inputs s ≈ 1 and the same λ values apply.
    """
    if not isinstance(tract_lambda_mode, str):
        raise TrActTypeError(
            f'tract_lambda_mode must be one of {", ".join(map(repr, LAMBDA_MODES))}, got '
            f'{type(tract_lambda_mode).__name__} {tract_lambda_mode!r}.')
    if tract_lambda_mode not in LAMBDA_MODES:
        raise TrActArgumentError(
            f'tract_lambda_mode must be one of {", ".join(map(repr, LAMBDA_MODES))}, got {tract_lambda_mode!r}.')
    return tract_lambda_mode


def set_gram_chunk_bytes(nbytes: Optional[int]) -> None:
    """Set the Gram chunk budget (bytes of patches materialized at once) for every device; None restores the default
    (`TIMM_TRACT_GRAM_CHUNK_MB` if set, else per device, see `gram_chunk_bytes`). Takes effect at the next backward."""
    global _chunk_bytes_setting
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
            raise TrActTypeError(f'set_gram_chunk_bytes takes an int number of bytes or None, got {nbytes!r}.')
        if nbytes < 1:
            raise TrActArgumentError(
                f'The Gram chunk budget must be >= 1 byte, got {nbytes}; pass None for the default.')
        nbytes = int(nbytes)
    _chunk_bytes_setting = nbytes


_device_memory_cache = {}


def _device_memory(device_type: str, index: Optional[int]) -> Optional[int]:
    """Total memory of an accelerator in bytes (None when its backend does not report it); cached per device."""
    key = (device_type, index)
    if key not in _device_memory_cache:
        try:
            backend = getattr(torch, device_type)
            total = int(backend.get_device_properties(index if index is not None else backend.current_device())
                        .total_memory)
        except Exception:
            total = None
        _device_memory_cache[key] = total
    return _device_memory_cache[key]


def gram_chunk_bytes(device: Union[str, torch.device, None] = None) -> int:
    """Bytes of unfolded patches the Gram materializes at once on `device` (default CPU), read at call time.

    In order: the value of `set_gram_chunk_bytes`; the environment variable `TIMM_TRACT_GRAM_CHUNK_MB` (MiB, may be
    fractional); else 8 MiB on CPU (and meta), and on accelerators 1/512 of the device memory within 64-256 MiB.
    A bigger budget means fewer, larger chunks (fewer kernel launches per backward, more transient memory).
    """
    if _chunk_bytes_setting is not None:
        return _chunk_bytes_setting
    env = os.environ.get(GRAM_CHUNK_ENV, '').strip()
    if env:
        try:
            mib = float(env)
        except ValueError:
            mib = float('nan')
        if not math.isfinite(mib) or mib * (1 << 20) < 1:
            raise TrActArgumentError(
                f'{GRAM_CHUNK_ENV}={env!r} is not a positive number of MiB; set it to e.g. 8 (CPU) or 256 (GPU), '
                f'or unset it for the per-device default.')
        return max(1, int(mib * (1 << 20)))
    device = torch.device(device if device is not None else 'cpu')
    if device.type in ('cpu', 'meta'):
        return _CPU_CHUNK_BYTES
    lo, hi = _ACCEL_CHUNK_BOUNDS
    total = _device_memory(device.type, device.index)
    if total is None:
        return lo
    return int(min(hi, max(lo, total * _ACCEL_CHUNK_FRACTION)))


def _chunk_elements(device: torch.device, dtype: torch.dtype) -> int:
    """The chunk budget in elements of `dtype`."""
    return max(1, gram_chunk_bytes(device) // dtype.itemsize)


@dataclass(frozen=True)
class ConvGeometry:
    """How a conv layer cuts its input into patches: explicit (left, right, top, bottom) padding, padding mode.
    Build it with `conv_geometry`."""
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    pad: Tuple[int, int, int, int]
    padding_mode: str
    groups: int


def _conv_pad(
        padding: Union[str, _IntPair],
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int],
) -> Tuple[int, int, int, int]:
    """Explicit F.pad tuple (left, right, top, bottom) for a Conv2d `padding` (int, pair, 'same' or 'valid')."""
    if padding == 'valid':
        return (0, 0, 0, 0)
    if padding == 'same':
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]  # (h, w), extra pixel right/bottom like torch
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


def _conv_out_size(x: torch.Tensor, geom: ConvGeometry) -> Tuple[int, int]:
    """(H_out, W_out) of the conv on x (B, C, H, W)."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    h = x.shape[2] + geom.pad[2] + geom.pad[3]
    w = x.shape[3] + geom.pad[0] + geom.pad[1]
    return (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1


def _gram_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gram_strips(n: int) -> Tuple[int, ...]:
    """Row-strip edges for the symmetric product: above _SYMMETRIC_MIN_N columns only the block-upper triangle of XᵀX
    is computed (4 strips: 10/16 of the flops), below it one full GEMM is faster."""
    strips = 4 if n >= _SYMMETRIC_MIN_N else 1
    return tuple(round(i * n / strips) for i in range(strips + 1))


def _accumulate_gram(gram: torch.Tensor, cols: torch.Tensor) -> None:
    """gram (g, n, n) += Σ_b cols_b cols_bᵀ for cols (b, g, n, L) (L = patches of one image).

    Only the block-upper triangle given by `_gram_strips` is written; `_mirror_gram` completes it."""
    b, g, n, length = cols.shape
    mat = cols[0] if b == 1 else cols.permute(1, 2, 0, 3).reshape(g, n, b * length)
    edges = _gram_strips(n)
    for lo, hi in zip(edges[:-1], edges[1:]):
        gram[:, lo:hi, lo:].baddbmm_(mat[:, lo:hi], mat[:, lo:].transpose(1, 2))


def _mirror_gram(gram: torch.Tensor) -> torch.Tensor:
    """Fill the blocks below the strips' diagonal blocks from their transposes (see `_accumulate_gram`)."""
    edges = _gram_strips(gram.shape[-1])
    for lo, hi in zip(edges[1:-1], edges[2:]):
        gram[:, lo:hi, :lo] = gram[:, :lo, lo:hi].transpose(1, 2)
    return gram


def _conv_patch_stats(x: torch.Tensor, geom: ConvGeometry, keep_rows: bool, same_on_every_rank: bool = False
                      ) -> Tuple[torch.Tensor, int]:
    """Patch statistics of a conv input x (B, C, H, W).

    `same_on_every_rank` (`sync_gram`): the centering does not depend on the local batch (where it applies, always),
    so every rank's Gram has the dtype and the value the all-reduce sums.

    Returns (S, N): N = B·H_out·W_out patch rows; S = XᵀX (groups, n, n) summed over rows, in float32 (float64 for
    float64 input), accumulated one bounded chunk of images/rows at a time; or, with `keep_rows`, the patch matrix X
    itself (groups, N, n) in float64 (only used when N < n: smaller than XᵀX, and its N×N system is solved in float64).
    The Gram path is `_gram_path`'s.
    """
    dtype = torch.float64 if keep_rows else _gram_dtype(x.dtype)
    batch, chans = x.shape[:2]
    g = geom.groups
    cg = chans // g
    n = cg * geom.kernel_size[0] * geom.kernel_size[1]
    (kh, _), (sh, _), (dh, _) = geom.kernel_size, geom.stride, geom.dilation
    pad_mode = 'constant' if geom.padding_mode == 'zeros' else geom.padding_mode
    h = x.shape[2] + geom.pad[2] + geom.pad[3]
    w = x.shape[3] + geom.pad[0] + geom.pad[1]
    h_out, w_out = _conv_out_size(x, geom)
    num_rows = batch * h_out * w_out
    if num_rows == 0:
        return x.new_zeros((g, 0, n) if keep_rows else (g, n, n), dtype=dtype), 0
    budget = _chunk_elements(x.device, dtype)
    path = 'rows' if keep_rows else _gram_path(geom, x.shape, h, w, x.device, budget)
    accumulator = None
    row_elements = n * g * w_out  # materialized elements per output row of one image
    if path == 'rows':
        out = x.new_empty((g, num_rows, n), dtype=dtype)
    elif path == 'spectral':
        plan = _spectral_plan(chans, geom.kernel_size, geom.stride, h, w, x.device, _data_window(geom, x.shape),
                              _dft_max_length(batch, x.device))
        accumulator = _SpectralGram(plan, dtype)
        row_elements = accumulator.plan.image_elements / h_out  # whole images only (see `_SpectralPlan`)
    elif path == 'shifted':
        accumulator = _ShiftedGram(chans, geom.kernel_size, geom.stride, w, dtype, x.device)
        row_elements = accumulator.row_elements
        budget = max(1, budget - accumulator.m * (accumulator.shifts - 1))  # V's slack rows
    else:
        out = x.new_zeros((g, n, n), dtype=dtype)
    # chunk = whole images while they fit the budget, else bands of output rows of one image
    per_image = row_elements * h_out
    images_per_chunk = max(_SPECTRAL_MIN_IMAGES if path == 'spectral' else 1, int(budget // per_image))
    rows_per_band = h_out if per_image <= budget or path == 'spectral' else max(1, int(budget // row_elements))
    # Grams of one group up to n = _FLOAT64_SOLVE_MAX_N of inputs far from zero mean (`_far_from_zero_mean`):
    # accumulated from the input minus a per-channel constant c (its batch mean), the uncentered Gram restored in
    # float64 (`_restore_offset`) from the batch sum Σ_b x_b: one pass over the input gives the sum and B·c (its mean
    # over the pixels)
    center = (path != 'rows' and g == 1 and n <= _FLOAT64_SOLVE_MAX_N
              and (same_on_every_rank or _far_from_zero_mean(x, budget)))
    if center:
        image_sum = x.sum(0, dtype=dtype)  # (C, H, W)
        offset_sum = image_sum.mean(dim=(1, 2)).view(-1, 1, 1)  # (C, 1, 1), B·c
    row = 0
    for b0 in range(0, batch, images_per_chunk):
        xb = x[b0:b0 + images_per_chunk].to(dtype=dtype, memory_format=torch.contiguous_format)
        if center:
            xb = torch.sub(xb, offset_sum, alpha=1 / batch)
        if path == 'spectral':
            accumulator.add(xb, geom.pad, pad_mode)  # pads (and crops) in one op
            continue
        if any(geom.pad):
            xb = F.pad(xb, geom.pad, mode=pad_mode)
        for r0 in range(0, h_out, rows_per_band):
            r = min(rows_per_band, h_out - r0)
            band = xb[:, :, r0 * sh: r0 * sh + (r - 1) * sh + dh * (kh - 1) + 1]
            if path == 'rows':
                cols = F.unfold(band, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)
                rows = cols.view(cols.shape[0], g, n, -1).permute(1, 0, 3, 2).reshape(g, -1, n)
                out[:, row:row + rows.shape[1]] = rows
                row += rows.shape[1]
            elif path == 'shifted':
                accumulator.add(band)
            else:
                cols = F.unfold(band, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)
                _accumulate_gram(out, cols.view(cols.shape[0], g, n, -1))  # (b, g, n, L)
    if path == 'rows':
        return out, num_rows
    gram = accumulator.gram()[None] if accumulator is not None else _mirror_gram(out)
    if center:
        gram = _restore_offset(gram, image_sum, offset_sum.view(-1), batch, geom, x.shape[2:])
    return gram, num_rows


# a batch is centered unless every channel's mean² is at most this fraction of its variance
_CENTER_MEAN_SQ_RATIO = 1 / 16
# inputs of up to this many channels sum their squares with one batched product (the diagonals of the per-image C × C
# products: no squared copy of the input, 1.5-2x faster for RGB), wider ones square and sum
_SQUARES_BY_PRODUCT_MAX_CHANNELS = 8


def _far_from_zero_mean(x: torch.Tensor, budget: int) -> bool:
    """Whether the Gram of x (B, C, H, W) is accumulated from the centered input (`_restore_offset`).

    The float32 Gram's rounding grows with mean² + variance of the entries; centering keeps it at the variance's.
    A batch whose every channel has mean² ≤ variance/16 (standardized inputs: timm's mean/std normalization) loses at
    most 1/16 of that to the raw values, so on CPU it skips the centering and the restore (about 15% of the Gram at
    32 px). The squares are summed a chunk of images at a time (`budget` elements; few channels: as the diagonals of
    per-image products, see `_SQUARES_BY_PRODUCT_MAX_CHANNELS`). Accelerators always center: the check would make the
    host wait for the device. NaN/Inf: not centered; the factorization reports them."""
    if x.device.type != 'cpu':
        return True
    dims, images, chans = (0, 2, 3), max(1, budget // max(1, x[0].numel())), x.shape[1]
    sums = x.sum(dims, dtype=_gram_dtype(x.dtype)).tolist()
    squares = [0.0] * chans
    for b0 in range(0, x.shape[0], images):
        chunk = x[b0:b0 + images]
        chunk = chunk if chunk.dtype in (torch.float32, torch.float64) else chunk.float()  # fp16 squares overflow
        if chans <= _SQUARES_BY_PRODUCT_MAX_CHANNELS:
            rows = chunk.reshape(chunk.shape[0], chans, -1)
            chunk_squares = torch.bmm(rows, rows.transpose(1, 2)).diagonal(dim1=1, dim2=2).sum(0)
        else:
            chunk_squares = chunk.square().sum(dims)
        squares = [a + b for a, b in zip(squares, chunk_squares.tolist())]
    count = x.numel() // x.shape[1]
    # per channel, s1 = Σx, s2 = Σx²: mean² > r·(E[x²] - mean²)  <=>  (1 + r)·s1² > r·count·s2
    ratio = _CENTER_MEAN_SQ_RATIO
    return any((1 + ratio) * s1 * s1 > ratio * count * s2 for s1, s2 in zip(sums, squares))


def _restore_offset(gram: torch.Tensor, image_sum: torch.Tensor, offset_sum: torch.Tensor, batch: int,
                    geom: ConvGeometry, size: Tuple[int, int]) -> torch.Tensor:
    """XᵀX (1, n, n) in float64 from the Gram X'ᵀX' of the centered input x' = x - c (c per channel).

    With zero padding X = X' + M̃, M̃[row, (c, t)] = c_c·M[row, t] (M: 1 where tap t of the row reads the image, not
    padding; other padding modes copy the input, so M = 1), hence XᵀX = X'ᵀX' + X'ᵀM̃ + M̃ᵀX' + M̃ᵀM̃ = X'ᵀX' + S + Sᵀ
    with S = X'ᵀM̃ + M̃ᵀM̃/2, S[(c, t), (c', t')] = c_c'·Q[(c, t), t']. With U = unfold(Σ_b x_b)·Mᵀ (the uncentered
    batch sum `image_sum`; unfold(1) = M, so X'ᵀM̃ = c_c'·(U - B·c_c·MMᵀ)), Q = U - (B/2)·c_c·MMᵀ[t, t']. M is
    separable (tap (i, j) at output (p, q) reads the image iff its row and its column do), so
    U[(c, i, j), (i', j')] = (R_y s_c R_xᵀ)[(i, i'), (j, j')] for s = Σ_b x_b (C, H, W) (in the Gram's dtype) and the
    line maps R of `_offset_lines`: two small products, no unfold. `offset_sum` (C,) is B·c. Q in float64; S and Sᵀ
    added as two multiply-adds (the second in place on the transposed result). Inputs far from zero mean (raw
    [0, 255] pixels, constant images) keep their accuracy: the float32 Gram only sees the centered values, and the
    offset terms carry float32's relative precision of XᵀX, not of the small centered part."""
    (kh, kw), chans = geom.kernel_size, image_sum.shape[0]
    (rows_y, rows_x), mask_gram, pad = _offset_lines(geom, tuple(size), image_sum.device)
    if pad:  # padding modes that copy the input: the maps read the padded image sum
        image_sum = F.pad(image_sum[None], geom.pad, mode=geom.padding_mode)[0]
    dtype, lines = image_sum.dtype, image_sum.shape[1]
    u = torch.mm(image_sum.reshape(-1, image_sum.shape[2]), rows_x[dtype].T).view(chans, lines, kw * kw)
    u = torch.bmm(rows_y[dtype].expand(chans, -1, -1), u)  # (C, (i, i'), (j, j'))
    u = u.view(chans, kh, kh, kw, kw).transpose(2, 3)  # (C, i, j, i', j')
    taps = kh * kw
    n = chans * taps
    q = u.new_empty((chans, kh, kw, kh, kw), dtype=torch.float64)  # Q, float64, (c, i, j) × (i', j') contiguous
    torch.addcmul(u, offset_sum.view(-1, 1, 1, 1, 1), mask_gram, value=-0.5, out=q)  # Q = U - (B·c_c / 2)·MMᵀ
    # S[(c, t), (c', t')] = Q[(c, t), t']·c_c', c_c' = (B·c_c') / B
    q, c = q.view(n, 1, taps), offset_sum.view(1, -1, 1)
    out = torch.addcmul(gram[0].view(n, -1, taps), q, c, value=1 / batch).view(n, n)  # X'ᵀX' + S
    out.T.view(n, -1, taps).addcmul_(q, c, value=1 / batch)  # + Sᵀ
    return out[None]


def _tap_lines(kernel: int, stride: int, dilation: int, before: int, after: int, length: int, zeros: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one dimension of a conv input of `length` lines padded by (`before`, `after`): R (kernel², lines) with
    R[(i, i'), y] = Σ_p [tap i of output p reads line y]·M[i', p], and M (kernel, outputs) (1 where tap i' of output
    p reads the input, not zero padding; always 1 unless `zeros`). With `zeros` the lines are the input's (padding
    is zeros), else the padded input's. float64."""
    outputs = (length + before + after - dilation * (kernel - 1) - 1) // stride + 1
    line = stride * torch.arange(outputs)[None, :] + dilation * torch.arange(kernel)[:, None]  # (kernel, outputs)
    lines = length + before + after
    if zeros:
        line, lines = line - before, length
    reads = (line >= 0) & (line < lines)
    mask = reads.to(torch.float64) if zeros else torch.ones(kernel, outputs, dtype=torch.float64)
    one_hot = torch.zeros(kernel, outputs, lines, dtype=torch.float64)
    i, p = reads.nonzero(as_tuple=True)
    one_hot[i, p, line[i, p]] = 1.0
    return (one_hot[:, None] * mask[None, :, :, None]).sum(2).reshape(kernel * kernel, lines), mask


@functools.lru_cache(maxsize=64)
def _offset_lines(geom: ConvGeometry, size: Tuple[int, int], device: torch.device
                  ) -> Tuple[Tuple[Dict[torch.dtype, torch.Tensor], ...], torch.Tensor, bool]:
    """The maps of `_restore_offset` for an input of `size` (H, W): (R_y, R_x) (`_tap_lines`, float32 and float64),
    MMᵀ (kh, kw, kh, kw) in float64 (MMᵀ[(i, j), (i', j')] = (M_y M_yᵀ)[i, i']·(M_x M_xᵀ)[j, j']), and whether they
    read the padded image (padding modes other than zeros)."""
    left, right, top, bottom = geom.pad
    zeros = geom.padding_mode == 'zeros'
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    rows_y, mask_y = _tap_lines(kh, sh, dh, top, bottom, size[0], zeros)
    rows_x, mask_x = _tap_lines(kw, sw, dw, left, right, size[1], zeros)
    gram_y, gram_x = ((m[:, None] * m[None]).sum(2) for m in (mask_y, mask_x))  # M Mᵀ along each dimension
    mask_gram = (gram_y[:, None, :, None] * gram_x[None, :, None, :]).to(device)
    maps = tuple({dtype: r.to(device, dtype) for dtype in (torch.float32, torch.float64)} for r in (rows_y, rows_x))
    return maps, mask_gram, not zeros


def _uses_shifted_gram(geom: ConvGeometry) -> bool:
    """Overlapping patches along the width (kw > sw), no dilation, one group: `_ShiftedGram` does fewer flops than the
    unfold."""
    return geom.groups == 1 and geom.dilation == (1, 1) and geom.kernel_size[1] > geom.stride[1]


# The spectral path's fixed accumulators (they do not grow with the batch) may take this many chunk budgets, and so may
# its smallest chunk, `_SPECTRAL_MIN_IMAGES` images (on CPU torch multiplies the complex (k × b)(b × k) matrices of a
# smaller chunk with an unblocked loop, 5-10x slower per image).
_SPECTRAL_BUDGETS = 4
_SPECTRAL_MIN_IMAGES = 4
# Spectral cost model (multiply-adds): its counted products cost about this many multiply-adds of the shifted path's
# GEMMs (they come with FFTs and gathers), plus a fixed cost per backward (inverse FFTs, the term combination);
# fitted to 1-thread CPU timings at B=32 of the 7×7/2 stem at 24-224 px and of 3×3/1, 3×3/2, 4×4/2, 5×5/1, 6×6/2,
# 7×7/4 and 9×9/2 convs.
_SPECTRAL_RATE_FACTOR = 4.0
_SPECTRAL_FIXED_MACS = 2e6
_PATH_BATCH = 32  # the batch the cost model is evaluated at
# at most this many tap groups U_h·U_w (its plan has (U_h·U_w)² blocks): 7×7/2 (16), 5×5/1 and 9×9/2 (25)
_SPECTRAL_MAX_TAP_GROUPS = 25
# transform lengths up to this on CPU: DFT products instead of FFTs (there the FFTs' strided complex copies cost more
# than the transforms; 1-thread CPU, B=32: the ResNet stem's Gram 0.4-0.8x the FFT version's time at 32-112 px
# (lengths 20-60), 0.88x at 128 px (length 68), where the dense transforms' L² grows; 3×3/1, 5×5/1, 6×6/2, 9×9/2
# convs 0.5-0.8x; accelerators keep the FFTs, which take fewer kernels). Batches of fewer than `_DFT_MIN_BATCH`
# images: up to half the length (the stem at 64 px and B=4: 0.94x, at B=8 0.81-0.83x the FFTs' time; at 32 px
# 0.6-0.9x at both).
_DFT_MAX_LENGTH = 64
_DFT_MIN_BATCH = 8


def _dft_max_length(batch: int, device: torch.device) -> int:
    """The longest transform a batch of `batch` images takes as DFT products (`_SpectralPlan.dft`): 0 (FFTs) off
    the CPU, so an accelerator caches one plan per geometry whatever the batch."""
    if device.type != 'cpu':
        return 0
    return _DFT_MAX_LENGTH if batch >= _DFT_MIN_BATCH else _DFT_MAX_LENGTH // 2


def _gram_path(geom: ConvGeometry, x_shape: Sequence[int], h_pad: int, w_pad: int, device: torch.device,
               budget: int) -> str:
    """How XᵀX of a conv input x (B, C, H, W) is accumulated; the rule (the same on every device):

    - 'spectral' (`_SpectralGram`): patches overlap along at least one dimension (kernel > stride), no dilation, one
      group, at most `_SPECTRAL_MAX_TAP_GROUPS` tap groups, its accumulators and a chunk of `_SPECTRAL_MIN_IMAGES`
      images each fit `_SPECTRAL_BUDGETS` chunk budgets, and its cost model
      (`_SPECTRAL_RATE_FACTOR` × its multiply-adds + `_SPECTRAL_FIXED_MACS`, at a batch of `_PATH_BATCH` images so
      the path does not change with the batch; the plan's multiply-adds count without the border terms of the zero
      padding's lines) is below the multiply-adds of the alternative (shifted, else unfold): the ResNet 7×7/2 stem
      from 16 px up (to about 440 px with the 8 MiB CPU budget), 3×3/1 from 24 px, 5×5/1 and 6×6/2 convs.
    - 'shifted' (`_ShiftedGram`): overlap along the width, no dilation, one group, where 'spectral' is not chosen
      (tiny images: the 7×7/2 stem below 16 px; 3×3/2, 4×4/2 and 7×7/4 stems, whose overlap is small).
    - 'unfold': everything else (non-overlapping patch embeds, dilated or grouped convs): unfold + GEMM.
    """
    if device.type == 'meta':  # shapes only: the plain path (no cached plans on the meta device)
        return 'unfold'
    batch, chans = _PATH_BATCH, x_shape[1]  # per geometry and image size: the same path (and ops) at every batch
    (kh, kw), (sh, sw) = geom.kernel_size, geom.stride
    h_out, w_out = (h_pad - kh) // sh + 1, (w_pad - kw) // sw + 1
    plain = geom.groups == 1 and geom.dilation == (1, 1)
    shifted = _uses_shifted_gram(geom)
    if shifted:
        units = -(-kw // sw)
        other_macs = batch * h_out * (w_out + units - 1) * units * (chans * kh * sw) ** 2
    else:
        other_macs = batch * h_out * w_out * (chans * kh * kw) ** 2
    if plain and (kh > sh or kw > sw) and -(-kh // sh) * -(-kw // sw) <= _SPECTRAL_MAX_TAP_GROUPS:
        plan = _spectral_plan(chans, geom.kernel_size, geom.stride, h_pad, w_pad, torch.device('meta'),
                              _data_window(geom, x_shape))
        spectral_macs = batch * plan.product_macs
        if (max(plan.accumulator_elements, _SPECTRAL_MIN_IMAGES * plan.image_elements) <= _SPECTRAL_BUDGETS * budget
                and _SPECTRAL_RATE_FACTOR * spectral_macs + _SPECTRAL_FIXED_MACS < other_macs):
            return 'spectral'
    return 'shifted' if shifted else 'unfold'


def _fft_size(n: int) -> int:
    """Smallest m ≥ n with no prime factor above 5 (fast FFT lengths)."""
    m = max(1, n)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class _SpectralPlan:
    """Index bookkeeping of `_SpectralGram` for one geometry and padded input size (cached by `_spectral_plan`).

    Tap (i, j) = (sh·u + a, sw·v + a') reads phase image k = (c, a, a') at (p + u, q + v), P_k[y, x] =
    xp[c, sh·y + a, sw·x + a'] (hp × wp = (H_out + U_h - 1) × (W_out + U_w - 1), U = ceil(kernel/stride); taps with
    i ≥ kh or j ≥ kw are phantom and dropped). The block of tap pair ((u, v), (u', v')) is
    T = Σ_{y ∈ Yw, x ∈ Xw} P[y + du, x + dv] P[y, x]ᵀ with (du, dv) = (u - u', v - v') over the window
    Yw × Xw = [u', u' + H_out) × [v', v' + W_out); by inclusion-exclusion
    T = C(du, dv) - Σ_{y ∉ Yw} R_y(du, dv) - Σ_{x ∉ Xw} Q_x(du, dv) + Σ_{y ∉ Yw, x ∉ Xw} K_yx(du, dv):
    C the full 2-D cross-correlation of the phase images (one FFT per image, lengths lh ≥ hp + U_h - 1 and
    lw ≥ wp + U_w - 1 so no lag aliases), R and Q 1-D correlations along one border row / column (at most
    U - 1 on each side), K single border points. Only the lags
    |du| < U_h, |dv| < U_w are ever used, so the correlations are inverse DFTs at those lags only (`inverse_x`,
    `inverse_y`, `inverse_c`: small matrices, each accumulated spectrum one product per dimension). Terms, in
    `selection`'s column order: C (Lh·Lw lags, L = 2U - 1), R (·Lw), K, Q (·Lh); `selection` (sparse CSR, ±1) maps
    them to the blocks of the pairs tap ≤ tap' ((u, v) row-major; XᵀX is symmetric: `order` reads the other blocks
    transposed, so only the terms these pairs use are formed). With zero padding, border terms that read a phase line
    holding only padding are 0 and left out, and the transforms start at the first data line (y0, x0) and cover
    yl × xl lines.
    """

    def __init__(self, chans: int, kernel_size: Tuple[int, int], stride: Tuple[int, int], h_pad: int, w_pad: int,
                 device: torch.device, data: Optional[Tuple[int, int, int, int]] = None, dft_max_length: int = 0):
        (kh, kw), (sh, sw) = kernel_size, stride
        self.chans, self.sh, self.sw = chans, sh, sw
        self.uh, self.uw = -(-kh // sh), -(-kw // sw)
        self.ho, self.wo = (h_pad - kh) // sh + 1, (w_pad - kw) // sw + 1
        self.hp, self.wp = self.ho + self.uh - 1, self.wo + self.uw - 1
        # phase lines that hold only zeros (zero padding, or beyond the input): their border terms vanish
        top, rows, left, cols = data if data is not None else (0, sh * self.hp, 0, sw * self.wp)
        self.zero_rows = _zero_phase_lines(top, rows, sh, self.hp)
        self.zero_cols = _zero_phase_lines(left, cols, sw, self.wp)
        self.m = m = chans * sh * sw
        # the FFTs see the phase lines from the first to the last one that is not zero: y0 .. y0 + extent - 1
        self.y0, self.yl = _data_extent(self.zero_rows, self.hp)
        self.x0, self.xl = _data_extent(self.zero_cols, self.wp)
        # the used lags do not alias at lengths >= yl + U_h - 1, xl + U_w - 1; FFTs take the next fast size
        self.lh, self.lw = _fft_size(self.yl + self.uh - 1), _fft_size(self.xl + self.uw - 1)
        # short lengths on CPU: the transforms are DFT products (`_SpectralGram._add_dft`), not FFTs, of the shortest
        # alias-free lengths (no fast FFT sizes needed: fewer bins to multiply)
        self.dft = data is not None and max(self.lh, self.lw) <= dft_max_length
        if self.dft:
            self.lh, self.lw = self.yl + self.uh - 1, self.xl + self.uw - 1
        self.fh, self.fw = self.lh // 2 + 1, self.lw // 2 + 1
        rows, cols, corners, entries = self._terms()
        col_lines = sorted({x for x, _ in cols} | {x + dv for x, dv in cols})  # the border columns' lines
        self.num_rows_terms, self.num_cols_terms, self.num_corners = len(rows), len(cols), len(corners)
        # accumulated products: the main and border cross-power spectra (m × m complex each), the corner points (m²)
        spectra = self.lh * self.fw + len(rows) * self.fw + len(cols) * self.fh
        self.accumulator_elements = spectra * 2 * m * m + self.num_corners * m * m
        # real multiply-adds of one image's products (4 per complex multiply-add; corner points)
        self.product_macs = spectra * 4 * m * m + self.num_corners * m * m
        # elements one image materializes: the padded input, its spectra (x, then y: complex), the border lines and
        # their spectra
        self.image_elements = m * (self.lh * self.lw + 4 * self.lh * self.fw + 4 * len(rows) * self.fw
                                   + len(col_lines) * (self.lh + 2 * self.fh) + 4 * len(cols) * self.fh
                                   + 2 * self.num_corners)
        if self.dft:  # padded input and its transpose, x-spectra, the 2-D spectra, border lines
            self.image_elements = m * (2 * self.yl * self.xl + 2 * self.yl * self.fw + 2 * self.lh * self.fw
                                       + 4 * len(rows) * self.fw + len(col_lines) * (self.yl + 2 * self.fh)
                                       + 4 * len(cols) * self.fh + 2 * self.num_corners)
        if device.type == 'meta':  # `_gram_path` only needs the sizes
            return

        def index(values):
            return torch.tensor(values, dtype=torch.long, device=device)
        # gathers (buffer lines: phase line - y0 or - x0): left operands (y + du, ...) first, then the right ones
        y0, x0 = self.y0, self.x0
        self.row_lines = index([y + du - y0 for y, du in rows] + [y - y0 for y, _ in rows])
        line = {x: i for i, x in enumerate(col_lines)}
        self.col_lines = index([x - x0 for x in col_lines])
        self.col_pairs = index([line[x + dv] for x, dv in cols] + [line[x] for x, _ in cols])
        # corner (y, du, x, dv): points (y + du, x + dv) and (y, x), flat indices: (line, y - y0) into the lines;
        # with `dft` (x - x0, y - y0) into the transposed phase images
        points = [(y + du, x + dv) for y, du, x, dv in corners] + [(y, x) for y, _, x, _ in corners]
        if self.dft:
            self.corner_points = index([(x - x0) * self.yl + y - y0 for y, x in points])
        else:
            self.corner_points = index([line[x] * self.lh + y - y0 for y, x in points])
        taps = self.uh * self.uw
        pairs = taps * (taps + 1) // 2
        lh_lags, lw_lags = 2 * self.uh - 1, 2 * self.uw - 1
        num_terms = lh_lags * lw_lags + len(rows) * lw_lags + len(corners) + len(cols) * lh_lags
        selection = torch.sparse_coo_tensor(
            index([[p for p, _, _ in entries], [t for _, t, _ in entries]]),
            torch.tensor([v for _, _, v in entries], dtype=torch.float64, device=device), (pairs, num_terms),
            check_invariants=False).coalesce()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": used here for one product only
            warnings.simplefilter('ignore', UserWarning)
            self.selection = {dtype: selection.to(dtype).to_sparse_csr() for dtype in (torch.float32, torch.float64)}
        # Gram entry ((c, i, j), (c', i', j')) = block of taps ((u, v), (u', v')) at (k, k') for tap ≤ tap', else
        # the transposed entry (k', k) of the block of (tap', tap)
        c, i, j = torch.arange(chans)[:, None, None], torch.arange(kh)[None, :, None], torch.arange(kw)[None, None, :]
        k = ((i % sh * sw + j % sw) * chans + c if self.dft else (c * sh + i % sh) * sw + j % sw).reshape(-1)
        tap = ((i // sh) * self.uw + j // sw).expand(chans, kh, kw).reshape(-1)
        upper = torch.full((taps, taps), -1, dtype=torch.long)
        upper[tuple(torch.triu_indices(taps, taps))] = torch.arange(pairs)  # the pair order of `_terms`
        swap = tap[:, None] > tap[None, :]
        block = upper[torch.minimum(tap[:, None], tap[None, :]), torch.maximum(tap[:, None], tap[None, :])]
        entry = torch.where(swap, k[None, :] * m + k[:, None], k[:, None] * m + k[None, :])
        self.order = (block * m * m + entry).reshape(-1).to(device)
        # inverse DFTs at the used lags: along x from the rfft's half spectrum, along y, along the columns (halved)
        self.inverse_x = _inverse_dft(self.uw, self.lw, True, device)
        self.inverse_y = _inverse_dft(self.uh, self.lh, False, device)
        self.inverse_c = _inverse_dft(self.uh, self.lh, True, device)
        # the terms' sizes in `selection`'s column order: C lags, R, K, Q
        self.term_sizes = (lh_lags * lw_lags, len(rows) * lw_lags, len(corners), len(cols) * lh_lags)
        if self.dft:
            self.dft_x, self.dft_y, self.dft_c = _dft_tables(self.xl, self.lw, self.yl, self.lh, device)
            self.real_inverse_x, self.real_inverse_c = (_real_inverse(t, False) for t in (self.inverse_x,
                                                                                           self.inverse_c))
            self.real_inverse_y = _real_inverse(self.inverse_y, True)

    def _terms(self):
        """Border-row terms (y, du), border-column terms (x, dv), corner terms (y, du, x, dv), and the selection
        entries (tap pair, term index, ±1); term indices: C lags (du, dv) at (du + U_h - 1)·Lw + dv + U_w - 1
        (`dft`: at (dv + U_w - 1)·Lh + du + U_h - 1), then R_y (dv), then the corners, then Q_x (du). Terms that
        read a zero line (`zero_rows`, `zero_cols`) are 0 and left out."""
        uh, uw, ho, wo, hp, wp = self.uh, self.uw, self.ho, self.wo, self.hp, self.wp
        lh_lags, lw_lags = 2 * uh - 1, 2 * uw - 1
        rows, cols, corners, raw = {}, {}, {}, []
        taps = [(u, v) for u in range(uh) for v in range(uw)]
        upper = [(t, t2) for i, t in enumerate(taps) for t2 in taps[i:]]  # the Gram is symmetric: tap ≤ tap'
        for pair, ((u, v), (u2, v2)) in enumerate(upper):
            du, dv = u - u2, v - v2
            lag = (dv + uw - 1) * lh_lags + du + uh - 1 if self.dft else (du + uh - 1) * lw_lags + dv + uw - 1
            raw.append((pair, 'main', lag, 1.0))
            ys = [y for y in list(range(u2)) + list(range(u2 + ho, hp))
                  if 0 <= y + du < hp and not {y, y + du} & self.zero_rows]
            xs = [x for x in list(range(v2)) + list(range(v2 + wo, wp))
                  if 0 <= x + dv < wp and not {x, x + dv} & self.zero_cols]
            for y in ys:
                raw.append((pair, 'row', rows.setdefault((y, du), len(rows)) * lw_lags + dv + uw - 1, -1.0))
            for x in xs:
                raw.append((pair, 'col', cols.setdefault((x, dv), len(cols)) * lh_lags + du + uh - 1, -1.0))
            for y, x in itertools.product(ys, xs):
                raw.append((pair, 'corner', corners.setdefault((y, du, x, dv), len(corners)), 1.0))
        base = {'main': 0, 'row': lh_lags * lw_lags}
        base['corner'] = base['row'] + len(rows) * lw_lags
        base['col'] = base['corner'] + len(corners)
        entries = [(pair, base[kind] + key, sign) for pair, kind, key, sign in raw]
        return list(rows), list(cols), list(corners), entries


def _inverse_dft(lags: int, length: int, halved: bool, device: torch.device) -> Dict[torch.dtype, torch.Tensor]:
    """E (2·lags - 1, bins), complex64 and complex128: Re(E @ S) is the inverse DFT of length `length` of a spectrum S
    (bins first) at the lags -(lags - 1) .. lags - 1. `halved`: S is an rfft's, bins = length // 2 + 1, and every bin
    but DC and Nyquist stands for its conjugate too (weight 2)."""
    bins = length // 2 + 1 if halved else length
    weight = torch.ones(bins, dtype=torch.float64)
    if halved:
        weight[1:length - bins + 1] = 2.0
    lag = torch.arange(-(lags - 1), lags, dtype=torch.float64)[:, None]
    table = torch.exp(2j * math.pi * lag * torch.arange(bins, dtype=torch.float64) / length) * weight / length
    table = table.to(device)
    return {torch.float32: table.to(torch.complex64), torch.float64: table}


def _real_inverse(table: Dict[torch.dtype, torch.Tensor], complex_out: bool) -> Dict[torch.dtype, torch.Tensor]:
    """An `_inverse_dft` table E (lags, bins) as a real matrix acting on spectra laid out (bin, re/im) (rows of a
    product), float32 and float64: (lags, 2·bins) giving Re(E S), or with `complex_out` (2·lags, 2·bins) giving
    [Re; Im](E S), rows (re/im, lag)."""
    er, ei = table[torch.float64].real, table[torch.float64].imag
    real = torch.stack([er, -ei], -1).flatten(1)
    if complex_out:
        real = torch.cat([real, torch.stack([ei, er], -1).flatten(1)])
    return {torch.float32: real.to(torch.float32), torch.float64: real}


def _dft_tables(xl: int, lw: int, yl: int, lh: int, device: torch.device
                ) -> Tuple[Dict[torch.dtype, torch.Tensor], ...]:
    """Real DFT matrices of `_SpectralGram._add_dft`, float32 and float64, θ = 2π·f·t/length:
    along x (2·fw, xl), rows (f, re/im) = (cos θ, -sin θ): the half spectrum of xl samples;
    along y (2·lh, 2·yl), rows (f, re/im), columns (re/im, t): the complex DFT of the x-spectra, [Re; Im] out of
    [[cos θ, sin θ], [-sin θ, cos θ]] [Re; Im] in (e^{-iθ}(a + ib) = a cos θ + b sin θ + i(b cos θ - a sin θ));
    along the columns (2·fh, yl), rows (f, re/im), half spectrum."""
    def table(bins: int, samples: int, length: int) -> torch.Tensor:
        return 2 * math.pi * torch.arange(bins, dtype=torch.float64)[:, None] * torch.arange(samples) / length
    tx, ty, tc = table(lw // 2 + 1, xl, lw), table(lh, yl, lh), table(lh // 2 + 1, yl, lh)
    cos_y, sin_y = ty.cos(), ty.sin()
    along_y = torch.stack([torch.stack([cos_y, sin_y], 1), torch.stack([-sin_y, cos_y], 1)], 1)  # (f, out, in, t)
    tables = (torch.stack([tx.cos(), -tx.sin()], 1).flatten(0, 1), along_y.reshape(2 * lh, 2 * yl),
              torch.stack([tc.cos(), -tc.sin()], 1).flatten(0, 1))
    return tuple({torch.float32: t.to(device, torch.float32), torch.float64: t.to(device)} for t in tables)


def _data_window(geom: ConvGeometry, x_shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """(top, rows, left, columns): where the padded input of x (B, C, H, W) holds data. Zero padding holds zeros;
    the other modes copy the input, so all of the padded input is data."""
    left, right, top, bottom = geom.pad
    if geom.padding_mode == 'zeros':
        return top, x_shape[2], left, x_shape[3]
    return 0, x_shape[2] + top + bottom, 0, x_shape[3] + left + right


def _zero_phase_lines(start: int, count: int, stride: int, lines: int) -> FrozenSet[int]:
    """The phase lines y < `lines` (input lines stride·y .. stride·y + stride - 1 of the padded input) that read none
    of the `count` data lines from `start` on."""
    return frozenset(y for y in range(lines) if stride * y + stride <= start or stride * y >= start + count)


def _data_extent(zero_lines: FrozenSet[int], lines: int) -> Tuple[int, int]:
    """(first, count): the phase lines from the first to the last one not in `zero_lines` (all of them if every line
    is zero)."""
    data = [y for y in range(lines) if y not in zero_lines]
    return (data[0], data[-1] - data[0] + 1) if data else (0, lines)


@functools.lru_cache(maxsize=64)
def _spectral_plan(chans: int, kernel_size: Tuple[int, int], stride: Tuple[int, int], h_pad: int, w_pad: int,
                   device: torch.device, data: Optional[Tuple[int, int, int, int]] = None, dft_max_length: int = 0
                   ) -> _SpectralPlan:
    """The cached `_SpectralPlan`; `data` (top, rows, left, columns): where the padded input holds data, not zero
    padding (None: everywhere); `dft_max_length`: the longest transforms taken as DFT products on CPU (0: FFTs)."""
    return _SpectralPlan(chans, kernel_size, stride, h_pad, w_pad, device, data, dft_max_length)


class _SpectralGram:
    """Exact XᵀX (n, n) of the patches of inputs (b, C, H, W) (one group, no dilation) from the cross-correlations of
    the stride-phase images (see `_SpectralPlan`), accumulated whole images at a time.

    Per chunk: the padded input viewed as its phase images (b, C, lh, sh, lw, sw); its x-spectrum and 2-D spectrum
    (an rfft along x, an fft along y), each written frequency first, (frequency, k, b); the border rows' 1-D spectra
    gathered from the x-spectrum; the border columns gathered (positions first) and transformed along y; one complex
    batched product Σ_b A Bᴴ per term kind; the border points, gathered from the column lines, in one real batched
    product. `gram` turns the accumulated cross-power spectra into correlations at the used lags only (inverse DFTs
    as small products: x, then y), concatenates the terms, combines the terms of every tap pair tap ≤ tap' with one
    sparse product and gathers the (c, i, j) order (the other pairs' blocks transposed). With `plan.dft` (short
    lengths on CPU) the transforms are products instead (`_add_dft`) and the same terms are computed in real
    arithmetic (`_dft_terms`).
    """

    def __init__(self, plan: _SpectralPlan, dtype: torch.dtype):
        self.plan, self.dtype = plan, dtype
        # FFT transforms: the accumulated cross-power spectra, complex
        self.main: Optional[torch.Tensor] = None  # (lh·fw, m, m) complex: Σ A Aᴴ of the 2-D spectra
        self.rows: Optional[torch.Tensor] = None  # (R·fw, m, m) complex
        self.cols: Optional[torch.Tensor] = None  # (Q·fh, m, m) complex
        self.corners: Optional[torch.Tensor] = None  # (K, m, m); with `plan.dft` a slice of `terms`
        self.blocks: Optional[torch.Tensor] = None  # with `plan.dft`: main, rows, cols as real (·, 2m, 2m) blocks
        self.terms: Optional[torch.Tensor] = None  # with `plan.dft`: (terms, m, m), the corners accumulated in place

    def _phase_images(self, x: torch.Tensor, pad: Tuple[int, int, int, int], pad_mode: str, lines: int,
                      length: int) -> torch.Tensor:
        """The phase images from line (y0, x0) on, (b, C, lines, sh, length, sw): the padded input cropped to
        sh·hp × sw·wp (beyond, the correlations assume zeros), then zero-padded (this also holds the phantom taps)."""
        pl = self.plan
        left, _, top, _ = pad
        rows, cols = min(x.shape[2], pl.sh * pl.hp - top), min(x.shape[3], pl.sw * pl.wp - left)
        top, left = top - pl.sh * pl.y0, left - pl.sw * pl.x0  # the leading zero phase lines are left out
        if pad_mode == 'constant' and rows > 0 and cols > 0:  # geometry padding, cropping, FFT padding in one op
            xp = F.pad(x[:, :, :rows, :cols], (left, pl.sw * length - left - cols, top, pl.sh * lines - top - rows))
        else:
            xp = F.pad(x, pad, mode=pad_mode)[:, :, pl.sh * pl.y0:pl.sh * pl.hp, pl.sw * pl.x0:pl.sw * pl.wp]
            xp = F.pad(xp, (0, pl.sw * length - xp.shape[3], 0, pl.sh * lines - xp.shape[2]))
        return xp.view(x.shape[0], pl.chans, lines, pl.sh, length, pl.sw)  # P_(c, a, a')[y, x] at [:, c, y, a, x, a']

    def add(self, x: torch.Tensor, pad: Tuple[int, int, int, int], pad_mode: str) -> None:
        """Accumulate the patches of x (b, C, H, W), `pad` (F.pad order) not yet applied."""
        pl = self.plan
        if pl.dft:
            return self._add_dft(self._phase_images(x, pad, pad_mode, pl.yl, pl.xl))
        b, m = x.shape[0], pl.m
        phases = self._phase_images(x, pad, pad_mode, pl.lh, pl.lw)
        # the spectra are written (FFT `out=`) frequency first, the batch last: x-spectrum, 2-D spectrum, border
        # columns' spectra in one buffer
        grid, col_lines = (pl.chans, pl.sh, pl.sw, b), pl.col_lines.numel()
        size = pl.lh * pl.fw * m * b
        buf = x.new_empty(2 * size + col_lines * pl.fh * m * b,
                          dtype=torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        fx = buf[:size].view(pl.lh, pl.fw, *grid)
        torch.fft.rfft(phases, dim=4, out=fx.permute(5, 2, 0, 3, 1, 4))
        main = buf[size:2 * size].view(pl.lh, pl.fw, *grid)
        torch.fft.fft(fx, dim=0, out=main)
        main = main.view(-1, m, b)  # (lh·fw, m, b)
        self.main = _add_product(self.main, main, main.conj())
        if pl.num_rows_terms:  # left and right lines in one gather
            lines = fx.index_select(0, pl.row_lines).view(2, -1, m, b)  # (2, R·fw, m, b)
            self.rows = _add_product(self.rows, lines[0], lines[1].conj())
        if pl.num_cols_terms:  # the border columns' lines (positions first), their spectra, the pairs of them
            lines = phases.permute(4, 2, 1, 3, 5, 0).index_select(0, pl.col_lines)  # (lines, lh, C, sh, sw, b)
            spectra = buf[2 * size:].view(col_lines, pl.fh, *grid)
            torch.fft.rfft(lines, dim=1, out=spectra)
            spectra = spectra.index_select(0, pl.col_pairs).view(2, -1, m, b)  # (2, Q·fh, m, b)
            self.cols = _add_product(self.cols, spectra[0], spectra[1].conj())
        if pl.num_corners:  # the border points lie on the border columns' lines
            points = lines.view(-1, m, b).index_select(0, pl.corner_points).view(2, -1, m, b)  # (2, K, m, b)
            self.corners = _add_product(self.corners, points[0], points[1])

    def _add_dft(self, phases: torch.Tensor) -> None:
        """`add` with DFT products: the phase images (b, C, yl, sh, xl, sw) transposed once to (x, y, k, b), k =
        (a, a', c), the batch last; the x-spectra (x-bin, re/im, y, k, b) one product; the 2-D spectra
        (x-bin, y-bin, re/im, k, b) one batched product over the x-bins (the complex DFT along y as a real
        (2·lh, 2·yl) matrix). Every spectrum [Re; Im] is then a real (2m, b) matrix, and Σ_b [Ar; Ai][Br; Bi]ᵀ holds
        Re and Im of Σ_b A Bᴴ (`_dft_spectra`). No complex copies, no combination of partial sums."""
        pl = self.plan
        b, m, yl, xl, lh, fw, fh = phases.shape[0], pl.m, pl.yl, pl.xl, pl.lh, pl.fw, pl.fh
        mb = m * b
        xt = phases.permute(4, 2, 3, 5, 1, 0).contiguous()  # (x, y, a, a', c, b)
        fx = torch.mm(pl.dft_x[self.dtype], xt.view(xl, -1)).view(fw, 2 * yl, mb)  # (x-bin, re/im·y, k·b)
        spectra = torch.bmm(pl.dft_y[self.dtype].expand(fw, -1, -1), fx)  # (x-bin, y-bin·re/im, k·b)
        first = self.blocks is None  # the first chunk writes the blocks (no zero fill), the others add to them
        if first:
            self.blocks = xt.new_empty(lh * fw + pl.num_rows_terms * fw + pl.num_cols_terms * fh, 2 * m, 2 * m)
            self.terms = xt.new_empty(sum(pl.term_sizes), m, m)
        main, rows, cols = self.blocks.split([lh * fw, pl.num_rows_terms * fw, pl.num_cols_terms * fh])
        spectra = spectra.view(fw * lh, 2 * m, b)
        _product_into(main, spectra, spectra, first)
        if pl.num_rows_terms:  # per line and x-bin [Re; Im] (2m, b): the x-spectra's lines, y first
            lines = fx.view(fw, 2, yl, mb).permute(2, 0, 1, 3).index_select(0, pl.row_lines)  # (2R, fw, re/im, k·b)
            lines = lines.view(2, -1, 2 * m, b)
            _product_into(rows, lines[0], lines[1], first)
        if pl.num_cols_terms:  # the border columns, their half spectra along y, the pairs of them
            lines = xt.index_select(0, pl.col_lines)  # (lines, y, a, a', c, b)
            spectra = torch.bmm(pl.dft_c[self.dtype].expand(lines.shape[0], -1, -1), lines.view(-1, yl, mb))
            spectra = spectra.index_select(0, pl.col_pairs).view(2, -1, 2 * m, b)  # (2, Q·fh, 2m, b)
            _product_into(cols, spectra[0], spectra[1], first)
        if pl.num_corners:  # accumulated in their slice of the terms
            points = xt.view(-1, m, b).index_select(0, pl.corner_points).view(2, -1, m, b)  # (2, K, m, b)
            self.corners = self.terms.narrow(0, sum(pl.term_sizes[:2]), pl.num_corners)
            _product_into(self.corners, points[0], points[1], first)

    def _dft_terms(self) -> torch.Tensor:
        """The terms (`selection`'s columns) (terms, m²) from the real blocks [[Σ Ar Brᵀ, Σ Ar Biᵀ], [Σ Ai Brᵀ,
        Σ Ai Biᵀ]], in real arithmetic: the spectra Re Σ A Bᴴ = Σ Ar Brᵀ + Σ Ai Biᵀ, Im = Σ Ai Brᵀ - Σ Ar Biᵀ
        written (block, re/im, m, m), so that (bin, re/im) are the rows of the inverse DFTs' products
        (`_real_inverse`), each written into its slice of the terms (no complex tensors, no concatenation)."""
        pl, m, g = self.plan, self.plan.m, self.blocks
        mm, dtype = m * m, self.dtype
        spectra = g.new_empty(g.shape[0], 2, m, m)
        torch.add(g[:, :m, :m], g[:, m:, m:], out=spectra[:, 0])
        torch.sub(g[:, m:, :m], g[:, :m, m:], out=spectra[:, 1])
        main, rows, cols = spectra.split([pl.lh * pl.fw, pl.num_rows_terms * pl.fw, pl.num_cols_terms * pl.fh])
        t_main, t_rows, _, t_cols = self.terms.split(pl.term_sizes)
        lags_x, lags_y = 2 * pl.uw - 1, 2 * pl.uh - 1
        ix = pl.real_inverse_x[dtype]
        # main: along y (complex out, batched over the x bins), then along x (real part)
        z = torch.bmm(pl.real_inverse_y[dtype].expand(pl.fw, -1, -1), main.view(pl.fw, 2 * pl.lh, mm))
        torch.mm(ix, z.view(2 * pl.fw, -1), out=t_main.view(lags_x, -1))  # (Lw, Lh·m²)
        if pl.num_rows_terms:
            torch.bmm(ix.expand(pl.num_rows_terms, -1, -1), rows.view(-1, 2 * pl.fw, mm),
                      out=t_rows.view(-1, lags_x, mm))  # (R, Lw, m²)
        if pl.num_cols_terms:
            torch.bmm(pl.real_inverse_c[dtype].expand(pl.num_cols_terms, -1, -1), cols.view(-1, 2 * pl.fh, mm),
                      out=t_cols.view(-1, lags_y, mm))  # (Q, Lh, m²)
        return self.terms.view(-1, mm)

    def gram(self) -> torch.Tensor:
        """The accumulated XᵀX (n, n), n = C·kh·kw in the weight's (c, i, j) order."""
        pl = self.plan
        terms = self._dft_terms() if pl.dft else self._fft_terms()
        blocks = pl.selection[self.dtype] @ terms  # (tap pairs tap ≤ tap', m·m)
        n = math.isqrt(pl.order.numel())
        return blocks.view(-1).index_select(0, pl.order).view(n, n)

    def _fft_terms(self) -> torch.Tensor:
        """The terms (`selection`'s columns) (terms, m²) from the accumulated cross-power spectra (complex)."""
        pl = self.plan
        mm, ix = pl.m * pl.m, pl.inverse_x[self.dtype]

        def at_lags(table: torch.Tensor, spectra: torch.Tensor, bins: int) -> torch.Tensor:
            """Inverse DFT of each (bins, m²) spectrum at the table's lags: (count, lags, m²), complex."""
            spectra = spectra.view(-1, bins, mm)
            return torch.bmm(table.expand(spectra.shape[0], -1, -1), spectra)
        # correlations at the used lags: inverse DFTs as products, x first (batched over the y bins), then y
        main = torch.mm(pl.inverse_y[self.dtype], at_lags(ix, self.main, pl.fw).view(pl.lh, -1))  # (Lh, Lw·m²)
        terms = [main.real.reshape(-1, mm)]  # (Lh·Lw, m²)
        if pl.num_rows_terms:
            terms.append(at_lags(ix, self.rows, pl.fw).real.reshape(-1, mm))  # (R·Lw, m²)
        if pl.num_corners:
            terms.append(self.corners.view(-1, mm))
        if pl.num_cols_terms:
            terms.append(at_lags(pl.inverse_c[self.dtype], self.cols, pl.fh).real.reshape(-1, mm))  # (Q·Lh, m²)
        return torch.cat(terms)


def _product_into(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, first: bool) -> None:
    """acc = left @ rightᵀ (batched) when `first`, else acc += left @ rightᵀ; acc a contiguous slice of the
    accumulator."""
    if first:
        torch.bmm(left, right.transpose(1, 2), out=acc)
    else:
        acc.baddbmm_(left, right.transpose(1, 2))


def _add_product(acc: Optional[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """acc + left @ rightᵀ (batched), starting the accumulator with the first product."""
    if acc is None:
        return torch.bmm(left, right.transpose(1, 2))
    return acc.baddbmm_(left, right.transpose(1, 2))


class _ShiftedGram:
    """Exact XᵀX (n, n) of the patches of padded inputs (b, C, H, W) (no dilation, one group), accumulated chunk by
    chunk without unfolding the kh·kw patches.

    With column j = sw·u + a (phase a < sw, shift u < U = ceil(kw/sw)), patch entry (c, i, j) at output (p, q) is
    V[b, p, q + u][c, i, a] with V[b, p, t][c, i, a] = xp[b, c, sh·p + i, sw·t + a]: only this vertical unfold V
    (C·kh·sw columns, about sw·U/kw of the full unfold's kw) is materialized, one chunk at a time, column-major
    (Vᶜ = Vᵀ, gathered along the input's rows). For δ = u - u' ≥ 0 the (u, u') block is
    Σ_{t=u'}^{u'+W_out-1} V[t+δ]ᵀV[t] = M_δ - Σ_{t<u'} E(δ,t) + Σ_{t=W_out}^{W_out+u'-1} E(δ,t),
    with M_δ = Σ_{t<W_out} V[t+δ]ᵀV[t] = F_δ - Σ_{t=W_out}^{W_out+U-2} E(δ,t), F_δ = Σ_r V[r+δ]ᵀV[r] over all rows r
    of V flattened (one batched GEMM of U products of shifted views of Vᶜ: U·(C·kh·sw)² instead of (C·kh·kw)² flops
    per row, e.g. 4·42² = 7056 vs 147² = 21609 for the 7×7 stride-2 ResNet stem), and E(δ,t) = Σ_{b,p} V[t+δ]ᵀV[t]
    a few edge terms; blocks with u < u' are transposes. The edge terms read the 2U-2 rows of V at each end of every
    block, gathered row-major in one op; then those of one t for every δ are one GEMM over the blocks (b, p) of
    strided views: V[t..t+U-1] (all δ at once) by V[t], batched over the U-1 values of t at each end. Vᶜ has U-1 zero
    columns of slack at its end: a term with t + δ ≥ T reads the next block's values (or the slack's zeros) just as
    F_δ does, so at the high end it cancels F_δ's overflow exactly; at the low end such terms are computed but
    unused. The block combination (a small dense ±1 product), the edge rows and the (c, i, j) gather are cached per
    geometry (`_shifted_plan`).
    """

    def __init__(self, chans: int, kernel_size: Tuple[int, int], stride: Tuple[int, int], w_in: int, dtype, device):
        self.plan = plan = _shifted_plan(chans, kernel_size, stride, w_in, torch.device(device))
        self.kh, self.sh, self.sw, self.chans = plan.kh, plan.sh, plan.sw, chans
        self.w_out, self.shifts, self.t_max, self.m = plan.w_out, plan.shifts, plan.t_max, plan.m
        self.row_elements = plan.row_elements
        # accumulators in one tensor: F_δ (U, m, m), then E(δ, t) for t < U-1, then for W_out <= t < W_out+U-1
        # ((U-1)·U blocks each, (t, δ) order)
        u, m = self.shifts, self.m
        self.acc = torch.zeros((u + 2 * (u - 1) * u, m, m), dtype=dtype, device=device)
        self.main = self.acc[:u]
        self.low = self.acc[u:u + (u - 1) * u].view(u - 1, u * m, m)
        self.high = self.acc[u + (u - 1) * u:].view(u - 1, u * m, m)

    def add(self, xp: torch.Tensor) -> None:
        """Accumulate the patches of xp (b, C, H, W), already padded, H covering whole output rows."""
        b = xp.shape[0]
        h_out = (xp.shape[2] - self.kh) // self.sh + 1
        width = self.sw * self.t_max
        xp = xp[:, :, :self.sh * (h_out - 1) + self.kh, :width]  # rows/columns no patch reaches
        if xp.shape[3] < width:  # columns only phantom taps j ≥ kw reach (dropped in `gram`)
            xp = F.pad(xp, (0, width - xp.shape[3]))
        blocks, t_max, m, u = b * h_out, self.t_max, self.m, self.shifts
        v = xp.reshape(b, self.chans, xp.shape[2], t_max, self.sw).unfold(2, self.kh, self.sh)
        rows = blocks * t_max
        # V column-major, Vᶜ (m, rows + U-1): row k = column (c, i, a) of V over the rows (b, p, t), gathered along
        # the input's rows (about 3x faster than a row-major gather), then U-1 columns of zero slack
        vc = xp.new_empty((m, rows + u - 1))
        vc[:, :rows].view(self.chans, self.kh, self.sw, b, h_out, t_max).copy_(v.permute(1, 5, 4, 0, 2, 3))
        vc[:, rows:].zero_()
        # flat products over all rows: [d] = Σ_r V[r + d]ᵀ V[r] = Vᶜ[:, d:d + rows] Vᶜ[:, :rows]ᵀ (r + d may run into
        # the next block or the slack); the shifted operands are views, no copy
        self.main.baddbmm_(vc.as_strided((u, m, rows), (1, rows + u - 1, 1)), vc[:, :rows].t().expand(u, rows, m))
        # edge terms: [t] = V[t..t+U-1]ᵀ V[t] summed over the rows (b, p), for t < U-1 and for t >= W_out, from the
        # 2U-2 rows of V at each end of every block gathered row-major (reading past the block's end as F_δ does)
        edge = vc.t().index_select(0, self.plan.edge_rows(blocks, vc.device))  # (2·blocks·(2U-2), m)
        span = 2 * u - 2
        for acc, end in ((self.low, 0), (self.high, 1)):
            start = end * blocks * span * m
            left = edge.as_strided((u - 1, u * m, blocks), (m, 1, span * m), start)
            right = edge.as_strided((u - 1, blocks, m), (m, span * m, 1), start)
            acc.baddbmm_(left, right)

    def gram(self) -> torch.Tensor:
        """The accumulated XᵀX (n, n), n = C·kh·kw in the weight's (c, i, j) order."""
        pl = self.plan
        blocks = pl.selection[self.acc.dtype] @ self.acc.view(self.acc.shape[0], -1)
        return blocks.view(-1).index_select(0, pl.order).view(pl.n, pl.n)


class _ShiftedPlan:
    """Sizes, the block combination and the (c, i, j) gather of `_ShiftedGram`."""

    def __init__(self, chans: int, kernel_size: Tuple[int, int], stride: Tuple[int, int], w_in: int,
                 device: torch.device):
        (self.kh, self.kw), (self.sh, self.sw) = kernel_size, stride
        self.w_out = (w_in - self.kw) // self.sw + 1
        self.shifts = u_count = -(-self.kw // self.sw)  # U
        self.t_max = self.w_out + u_count - 1
        self.m = m = chans * self.kh * self.sw
        self.n = chans * self.kh * self.kw
        # elements materialized per output row of one image: its row of Vᶜ and its 2·(2U-2) gathered edge rows
        self.row_elements = m * (self.t_max + 4 * (u_count - 1))
        self._edge_rows = {}
        # accumulator terms: the flat products F_δ at δ, E(δ, t) at U + t·U + δ (low end) and at
        # U + (U-1)·U + t·U + δ for E(δ, W_out + t); M_δ = F_δ - Σ_{t<U-1} E(δ, W_out + t)
        high = u_count + (u_count - 1) * u_count
        # block (δ, u') of taps u = u' + δ ≥ u': M_δ + Σ_{t<u'} (E(δ, W_out + t) - E(δ, t))
        #   = F_δ - Σ_{u'<=t<U-1} E(δ, W_out + t) - Σ_{t<u'} E(δ, t)
        block_id = {}
        selection = torch.zeros((u_count * (u_count + 1) // 2, high + (u_count - 1) * u_count), dtype=torch.float64)
        for d in range(u_count):
            for u_prime in range(u_count - d):
                k = block_id.setdefault((d, u_prime), len(block_id))
                selection[k, d] = 1.0
                for t in range(u_prime, u_count - 1):
                    selection[k, high + t * u_count + d] = -1.0
                for t in range(u_prime):
                    selection[k, u_count + t * u_count + d] = -1.0
        self.selection = {dtype: selection.to(device, dtype) for dtype in (torch.float32, torch.float64)}
        # Gram entry ((c, i, j), (c', i', j')): k = (c, i, j mod sw), u = j // sw; u ≥ u': block (u - u', u') at
        # (k, k'), else the transpose: block (u' - u, u) at (k', k)
        ci = torch.arange(chans * self.kh)[:, None]
        j = torch.arange(self.kw)[None, :]
        k = (ci * self.sw + j % self.sw).reshape(-1)
        u = (j // self.sw).expand(chans * self.kh, -1).reshape(-1)
        ids = torch.full((u_count, u_count), -1, dtype=torch.long)
        for (d, u_prime), b in block_id.items():
            ids[u_prime + d, u_prime] = b
            ids[u_prime, u_prime + d] = b
        upper = u[:, None] >= u[None, :]
        kk = torch.where(upper, k[:, None] * m + k[None, :], k[None, :] * m + k[:, None])
        self.order = (ids[u[:, None], u[None, :]] * m * m + kk).reshape(-1).to(device)


    def edge_rows(self, blocks: int, device: torch.device) -> torch.Tensor:
        """Flat row indices r = block·T + t of V for t in [0, 2U-2) and in [W_out, W_out + 2U-2), every block
        (low end first), cached per block count (a chunk's b·H_out)."""
        if blocks not in self._edge_rows:  # built on the device (no host-to-device copy, no sync)
            if len(self._edge_rows) >= 8:
                self._edge_rows.clear()
            span = 2 * self.shifts - 2
            t = torch.arange(2, device=device).view(2, 1, 1) * self.w_out + torch.arange(span, device=device)
            rows = torch.arange(blocks, device=device).view(1, -1, 1) * self.t_max + t
            self._edge_rows[blocks] = rows.reshape(-1)
        return self._edge_rows[blocks]


@functools.lru_cache(maxsize=64)
def _shifted_plan(chans: int, kernel_size: Tuple[int, int], stride: Tuple[int, int], w_in: int,
                  device: torch.device) -> _ShiftedPlan:
    return _ShiftedPlan(chans, kernel_size, stride, w_in, device)


def _linear_patch_stats(x: torch.Tensor, keep_rows: bool) -> Tuple[torch.Tensor, int]:
    """As `_conv_patch_stats` for a Linear input x (..., n): rows are all leading positions; groups = 1."""
    dtype = _gram_dtype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    num_rows, n = rows.shape
    if keep_rows:
        return rows.to(torch.float64).unsqueeze(0), num_rows
    gram = x.new_zeros((1, n, n), dtype=dtype)
    step = max(1, _chunk_elements(x.device, dtype) // max(n, 1))
    for r0 in range(0, num_rows, step):
        chunk = rows[r0:r0 + step].to(dtype)
        gram[0].addmm_(chunk.T, chunk)
    return gram, num_rows


def patch_gram(x: torch.Tensor, geom: Optional[ConvGeometry] = None) -> Tuple[torch.Tensor, int]:
    """XᵀX of the unfolded input, (groups, n, n) float32/64, summed (not averaged) over the N rows; returns (XᵀX, N).

    `geom` None means a Linear layer (x (..., n)); otherwise a conv input x (B, C, H, W).
    """
    if geom is None:
        return _linear_patch_stats(x, keep_rows=False)
    return _conv_patch_stats(x, geom, keep_rows=False)


# systems up to this n are factorized and solved in float64 (stems: n = 27-147; cheap next to the Gram), larger ones
# (ViT patch embeds, n = 768) in the Gram's dtype
_FLOAT64_SOLVE_MAX_N = 384


def _pd_error(system: torch.Tensor, x: Optional[torch.Tensor], tract_lambda: float) -> NotPositiveDefiniteError:
    """The error for a failed factorization, naming the case: NaN/Inf in the input; a Gram that overflows; an input far
    from zero mean whose Gram lost the digits λ needs; a rank-deficient Gram with a λ too small for its scale."""
    head = 'TrAct: the system XᵀX/N + λI is not positive definite'
    if x is not None and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        return NotPositiveDefiniteError(
            f'{head}: the first layer input holds {bad} NaN/Inf value(s). Check the input batch (data pipeline, '
            f'augmentation, an earlier fp16 overflow); TrAct wrote no gradient for this step.')
    finite = bool(torch.isfinite(system).all())
    if x is None and not finite:
        return NotPositiveDefiniteError(
            f'{head}: XᵀX holds NaN/Inf (NaN/Inf in the input, or an input scale so large that XᵀX overflows its '
            f'dtype). Check the input batch for NaN/Inf, standardize it to mean 0 / std 1, or raise tract_lambda.')
    max_abs = f' (max |x| = {float(x.abs().max()):.3g})' if x is not None else ''
    if not finite:
        return _scale_error(head, max_abs, system, tract_lambda)
    diag = system.diagonal(dim1=-2, dim2=-1)
    scale = float(diag.max()) - tract_lambda  # the largest diagonal entry of XᵀX/N (λ·s in relative mode: ~0)
    if x is not None:
        xd = x.double()
        mean, std = float(xd.mean()), float(xd.std()) if xd.numel() > 1 else 0.0
        if x.dtype != torch.float64 and abs(mean) > 10 * std:
            return NotPositiveDefiniteError(
                f'{head}: the input is far from zero mean (mean {mean:.3g}, std {std:.3g}), so its '
                f'{_gram_dtype(x.dtype)} Gram XᵀX/N (entries up to {scale:.3g}) lost the digits λ={tract_lambda:g} '
                f'needs. Standardize the input (subtract the mean, e.g. timm\'s mean/std normalization), or compute '
                f'this layer in float64.')
    eps = torch.finfo(system.dtype).eps
    if tract_lambda <= system.shape[-1] * eps * max(scale, 0.0):
        return NotPositiveDefiniteError(
            f'{head}: λ={tract_lambda:g} is below the {system.dtype} resolution of XᵀX/N (largest entry '
            f'{scale:.3g}), and XᵀX is rank-deficient (fewer distinct patches than n = {system.shape[-1]}, e.g. '
            f'constant or heavily padded images), so the system is singular at this precision. Raise tract_lambda '
            f'(or use tract_lambda_mode=\'relative\', which scales λ with the input).')
    return _scale_error(head, max_abs, system, tract_lambda)


def _scale_error(head: str, max_abs: str, system: torch.Tensor, tract_lambda: float) -> NotPositiveDefiniteError:
    return NotPositiveDefiniteError(
        f'{head}: the input is finite but its scale{max_abs} is too large for a {system.dtype} Gram (XᵀX/N '
        f'overflows, or λ={tract_lambda:g} is lost against it). Standardize the input to mean 0 / std 1 (the '
        f'scale the paper\'s λ is meant for), or raise tract_lambda.')


def _cholesky(a: torch.Tensor, x: Optional[torch.Tensor], tract_lambda: float
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Upper Cholesky factor U (a = UᵀU) of the TrAct system `a` (g, k, k) and its LAPACK info (CPU: None, checked
    already). The upper factor of torch's row-major matrices is LAPACK's lower one: about 10% faster to factorize and
    solve with at n = 147 (1-thread CPU)."""
    if a.device.type == 'cpu':
        try:
            return torch.linalg.cholesky(a, upper=True), None
        except torch.linalg.LinAlgError:
            raise _pd_error(a, x, tract_lambda) from None
    return torch.linalg.cholesky_ex(a, upper=True)


def _check_solution(info: Optional[torch.Tensor], out: torch.Tensor, system: torch.Tensor, x: Optional[torch.Tensor],
                    tract_lambda: float) -> None:
    """Fail loudly (not with NaN weights) when the TrAct system is not positive definite or not finite.

    CPU: the factorization raised already for a non-positive-definite system (`_cholesky`); a NaN/Inf solution (NaN/Inf
    in the system, which LAPACK does not always report) raises a `NotPositiveDefiniteError` naming the cause.
    Accelerators: a device-side assert (`torch._assert_async`), which never makes the host wait
    for the device (no sync per step, CUDA-graph safe); the failure surfaces at the next synchronization.
    """
    if out.device.type == 'meta':
        return
    if out.device.type != 'cpu':
        ok = (info.sum() + out.sum() * 0) == 0  # NaN when the solution is not finite
        torch._assert_async(ok, 'TrAct: the system XᵀX/N + λI is not positive definite (NaN/Inf in the first layer '
                                'input, or an input scale too large); standardize the input or raise tract_lambda.')
    elif not math.isfinite(float(out.detach().sum())):
        raise _pd_error(system, x, tract_lambda)


def _relative_scale(stats: torch.Tensor, num_rows: Union[int, torch.Tensor], rows_form: bool) -> torch.Tensor:
    """s = tr(XᵀX/N)/n per group, (g, 1, 1), from the Gram (or, with `rows_form`, from the rows X (g, N, n)).

    s = 0 (an all-zero input, or entries whose squares underflow) gives 1: that step uses the absolute λ (X = 0 makes
    the ordinary gradient GᵀX and so the TrAct gradient exactly 0). A NaN/Inf s is kept: the system is then not finite
    and the positive-definiteness check reports it, never a silent NaN."""
    n = stats.shape[-1]
    if rows_form:
        total = stats.square().sum(dim=(1, 2), keepdim=True)
    else:
        total = stats.diagonal(dim1=1, dim2=2).sum(dim=1).view(-1, 1, 1)
    rows = num_rows.clamp(min=1) if isinstance(num_rows, torch.Tensor) else max(num_rows, 1)
    s = total / (rows * n)
    return torch.where(s == 0, torch.ones_like(s), s)


def _precondition(
        grad_w: torch.Tensor,
        stats: torch.Tensor,
        num_rows: Union[int, torch.Tensor],
        tract_lambda: float,
        rows_form: bool,
        x: Optional[torch.Tensor],
        lambda_mode: str = DEFAULT_LAMBDA_MODE,
) -> torch.Tensor:
    """`tract_precondition` without validating λ; `x` (the layer input, or None) only names the cause of a failure.

    The N×N Woodbury system is solved in float64 (its rows are float64); the n×n system in float64 up to
    n = `_FLOAT64_SOLVE_MAX_N`, else in the Gram's dtype."""
    g, n = stats.shape[0], stats.shape[-1]
    solve_dtype = torch.float64 if rows_form or n <= _FLOAT64_SOLVE_MAX_N else stats.dtype
    p = grad_w.reshape(g, -1, n).to(solve_dtype)  # (g, m_g, n)
    lam = tract_lambda if lambda_mode == 'absolute' else tract_lambda * _relative_scale(stats, num_rows, rows_form)
    if rows_form:
        # P (XᵀX/N + λI)⁻¹ = (P - (P Xᵀ) (NλI + XXᵀ)⁻¹ X) / λ
        rows = stats
        k = torch.matmul(rows, rows.transpose(1, 2))
        k.diagonal(dim1=1, dim2=2).add_(num_rows * lam if isinstance(lam, float) else (num_rows * lam).view(g, 1))
        chol, info = _cholesky(k, x, tract_lambda)
        y = torch.cholesky_solve(torch.matmul(rows, p.transpose(1, 2)), chol, upper=True)  # (g, N, m_g)
        out = (p - torch.matmul(y.transpose(1, 2), rows)) / lam
        system = k
    else:
        a = _tract_system(stats, num_rows, lam, solve_dtype)
        chol, info = _cholesky(a, x, tract_lambda)
        out = torch.cholesky_solve(p.transpose(1, 2), chol, upper=True).transpose(1, 2)  # P A⁻¹ = (A⁻¹ Pᵀ)ᵀ
        system = a
    # check the factor, not the solution: a non-finite incoming gradient (an fp16 overflow that GradScaler skips)
    # passes through as for the plain layer, and only a bad system raises
    _check_solution(info, chol, system, x, tract_lambda)
    return out.reshape(grad_w.shape).to(grad_w.dtype)


def _tract_system(stats: torch.Tensor, num_rows: Union[int, torch.Tensor], lam: Union[float, torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """XᵀX/N + λI (g, n, n) in `dtype` from XᵀX (g, n, n); λ a float or (g, 1, 1). A float λ with an int N is one op
    (a cached λI plus the scaled Gram)."""
    if isinstance(lam, float) and not isinstance(num_rows, torch.Tensor):
        return torch.add(_scaled_identity(stats.shape[-1], lam, dtype, stats.device), stats, alpha=1 / max(num_rows, 1))
    a = stats.to(dtype) / (num_rows.clamp(min=1) if isinstance(num_rows, torch.Tensor) else max(num_rows, 1))
    a.diagonal(dim1=1, dim2=2).add_(lam if isinstance(lam, float) else lam.view(-1, 1).to(dtype))
    return a


@functools.lru_cache(maxsize=16)
def _scaled_identity(n: int, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """value·I (n, n), cached (λ is fixed per layer): adding it to XᵀX/N is one op."""
    return torch.eye(n, dtype=dtype, device=device).mul_(value)


def tract_precondition(
        grad_w: torch.Tensor,
        stats: torch.Tensor,
        num_rows: Union[int, torch.Tensor],
        tract_lambda: float,
        rows_form: bool = False,
        tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
) -> torch.Tensor:
    """Apply (XᵀX/N + λI)⁻¹ (relative mode: (XᵀX/N + λ·s·I)⁻¹, s = tr(XᵀX/N)/n) from the right to an ordinary weight
    gradient.

    Args:
        grad_w: ordinary gradient GᵀX, (m, n) viewed per group as (groups, m/groups, n); any float dtype.
        stats: XᵀX (groups, n, n) summed over rows, or with `rows_form` the rows X (groups, N, n) (Woodbury, N < n).
        num_rows: N, the number of patch rows (an int, or a 0-d tensor on the device of `stats`).
        tract_lambda: λ > 0.
        tract_lambda_mode: 'absolute' or 'relative' (see `check_lambda_mode`).
    Returns:
        The TrAct gradient, shape and dtype of `grad_w`.
    Raises:
        NotPositiveDefiniteError (CPU) when the system cannot be factorized (see `_check_solution` for accelerators).
    """
    return _precondition(grad_w, stats, num_rows, check_lambda(tract_lambda), rows_form, None,
                         check_lambda_mode(tract_lambda_mode))


def _sync_gram(gram: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, Union[int, torch.Tensor]]:
    """All-reduce XᵀX and N over the default process group (no-op when none is initialized; a 1-process group runs
    the collective too, so single-GPU runs exercise the multi-GPU path).

    N comes back as a 0-d tensor on the Gram's device, so nothing waits for the device."""
    if not (dist.is_available() and dist.is_initialized()):
        return gram, num_rows
    flat = torch.cat([gram.reshape(-1), gram.new_full((1,), float(num_rows))])
    dist.all_reduce(flat)
    return flat[:-1].view_as(gram), flat[-1]


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _tract_backward(ctx, grad_w: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], None, None, None, None, None]:
    """The backward of both forms of the TrAct op (`_TrActWeightGrad`, `_TrActWeightGradTransformable`)."""
    if grad_w is None:
        return None, None, None, None, None, None
    x, = ctx.saved_tensors
    geom = ctx.geom
    if torch.compiler.is_compiling():  # one opaque op (`_weight_grad_op`): the compiled graph stays whole
        geometry = [] if geom is None else [*geom.kernel_size, *geom.stride, *geom.dilation, *geom.pad, geom.groups]
        grad = _weight_grad_op(grad_w, x, geometry, '' if geom is None else geom.padding_mode, ctx.tract_lambda,
                               ctx.sync_gram, ctx.lambda_mode)
        return grad, None, None, None, None, None
    if _is_vmapped(grad_w) or _is_vmapped(x):
        raise TrActArgumentError(
            'TrAct: per-sample weight gradients (torch.func.vmap over a gradient w.r.t. the TrAct layer\'s weight) '
            'are not supported: the TrAct gradient is defined by the Gram XᵀX of the whole batch. Take input '
            'gradients (jacrev/vmap w.r.t. the input work), or call timm_tract.remove_tract(model) first for '
            'per-sample gradients of the plain model.')
    grad = _weight_grad(grad_w, x, geom, ctx.tract_lambda, ctx.sync_gram, ctx.lambda_mode)
    return grad, None, None, None, None, None


def _save_inputs(ctx, x: torch.Tensor, geom: Optional[ConvGeometry], tract_lambda: float, sync_gram: bool,
                 lambda_mode: str) -> None:
    ctx.save_for_backward(x)
    ctx.geom, ctx.tract_lambda, ctx.sync_gram, ctx.lambda_mode = geom, tract_lambda, sync_gram, lambda_mode


class _TrActWeightGrad(torch.autograd.Function):
    """Identity on the weight in forward; in backward turns the ordinary weight gradient into the TrAct gradient.

    The patch statistics come from `x` (the layer input, detached) at backward time, so nothing beyond what the layer
    saves anyway is kept alive, and no work is done when no backward happens.

    The classic form (`forward(ctx, ...)`), what a plain training step runs: about 1/8 of the per-call cost of the
    `setup_context` form, whose `apply` binds the arguments through `inspect.signature` at every call (~80 µs on
    CPU). Under torch.func transforms and torch.compile `tract_weight` uses `_TrActWeightGradTransformable`.
    """

    @staticmethod
    def forward(ctx, weight, x, geom, tract_lambda, sync_gram, lambda_mode):
        _save_inputs(ctx, x, geom, tract_lambda, sync_gram, lambda_mode)
        return weight.view_as(weight)

    backward = staticmethod(_tract_backward)


class _TrActWeightGradTransformable(torch.autograd.Function):
    """`_TrActWeightGrad` in the new-style form (`setup_context`) with a generated vmap rule, so `jacrev`,
    `jvp`-free input transforms and `vmap` over inputs work (the forward is the identity on the weight); a vmapped
    backward (per-sample weight gradients, `vmap(grad(...))` w.r.t. the parameters) is refused in backward: the TrAct
    gradient is defined by the Gram of the whole batch.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(weight, x, geom, tract_lambda, sync_gram, lambda_mode):
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, geom, tract_lambda, sync_gram, lambda_mode = inputs
        _save_inputs(ctx, x, geom, tract_lambda, sync_gram, lambda_mode)

    backward = staticmethod(_tract_backward)


def _weight_grad(grad_w: torch.Tensor, x: torch.Tensor, geom: Optional[ConvGeometry], tract_lambda: float,
                 sync_gram: bool, lambda_mode: str) -> torch.Tensor:
    """The TrAct gradient from the ordinary one, grad_w (shape of the weight), and the layer input x."""
    x = _without_grad_wrappers(x)
    n = grad_w[0].numel()  # C_in/groups·kh·kw (conv) or in_features (linear)
    num_rows = x[..., 0].numel() if geom is None else x.shape[0] * math.prod(_conv_out_size(x, geom))
    rows_form = num_rows < n and not sync_gram  # under sync_gram the n×n Gram is what the ranks all-reduce
    with _autocast_off(x.device.type):  # backward may run inside the caller's autocast region
        with torch._C._DisableFuncTorch():  # plain tensors (see `_without_grad_wrappers`), not torch.func's
            if geom is None:
                stats, num_rows = _linear_patch_stats(x, keep_rows=rows_form)
            else:
                stats, num_rows = _conv_patch_stats(x, geom, keep_rows=rows_form, same_on_every_rank=sync_gram)
            if sync_gram:
                stats, num_rows = _sync_gram(stats, num_rows)
        return _precondition(grad_w, stats, num_rows, tract_lambda, rows_form, x, lambda_mode)


@torch.library.custom_op('timm_tract::weight_grad', mutates_args=())
def _weight_grad_op(grad_w: torch.Tensor, x: torch.Tensor, geometry: List[int], padding_mode: str,
                    tract_lambda: float, sync_gram: bool, lambda_mode: str) -> torch.Tensor:
    """`_weight_grad` as one opaque op, what the backward calls while torch.compile traces it: the compiled graph
    (also `fullgraph=True`, CUDA graphs) runs it as it is, without tracing the Gram plans (sparse tensors, cached
    plans), so the graph around the TrAct layer stays whole. Eager backward calls `_weight_grad` directly (also
    under torch.func transforms, which a custom op without an autograd formula would refuse). `geometry`: [] for a
    Linear, else the ConvGeometry fields (kh, kw, sh, sw, dh, dw, left, right, top, bottom, groups)."""
    geom = None
    if geometry:
        kh, kw, sh, sw, dh, dw, left, right, top, bottom, groups = geometry
        geom = ConvGeometry((kh, kw), (sh, sw), (dh, dw), (left, right, top, bottom), padding_mode, groups)
    return _weight_grad(grad_w, x, geom, tract_lambda, sync_gram, lambda_mode)


@_weight_grad_op.register_fake
def _(grad_w, x, geometry, padding_mode, tract_lambda, sync_gram, lambda_mode):
    return grad_w.new_empty(grad_w.shape)


def _without_grad_wrappers(t: torch.Tensor) -> torch.Tensor:
    """t without torch.func's grad wrappers. In a backward run by `torch.func.grad` every new tensor is wrapped, and
    the Gram plans' sparse product takes plain tensors only; the patch statistics are of the detached input anyway,
    so `_weight_grad` computes them from the plain input with torch.func switched off."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t) and not functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _is_vmapped(t: torch.Tensor) -> bool:
    """True for a tensor batched by torch.func.vmap (also one wrapped by a grad transform around it).

    Not traceable by dynamo (a graph break in the compiled backward): not asked while torch.compile traces."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def tract_weight(
        weight: torch.Tensor,
        x: torch.Tensor,
        geom: Optional[ConvGeometry],
        tract_lambda: float,
        sync_gram: bool = False,
        tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
) -> torch.Tensor:
    """`weight` as it enters the layer's native op: the same values, with the TrAct weight gradient in backward.

    Args:
        weight: the layer weight, (C_out, C_in/groups, kh, kw) for a conv, (m, n) for a Linear.
        x: the layer input, (B, C_in, H, W) for a conv (before any padding), (..., n) for a Linear.
        geom: `conv_geometry(...)` of the conv, or None for a Linear.
        tract_lambda: λ > 0 (not validated here; see `check_lambda`).
        sync_gram: all-reduce XᵀX and N over the default process group in backward (relative mode: s is then the
            global Gram's trace).
        tract_lambda_mode: 'absolute' or 'relative' (not validated here; see `check_lambda_mode`).
    Returns the weight unchanged (no autograd op) when no gradient is needed.
    """
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight
    transformable = torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
    op = _TrActWeightGradTransformable if transformable else _TrActWeightGrad
    return op.apply(weight, x.detach(), geom, tract_lambda, sync_gram, tract_lambda_mode)


def conv_geometry(
        weight_shape: Sequence[int],
        stride: _IntPair = 1,
        padding: Union[str, _IntPair] = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        padding_mode: str = 'zeros',
) -> ConvGeometry:
    """How a conv with weight (C_out, C_in/groups, kh, kw) and these nn.Conv2d settings cuts its input into patches:
    the `geom` of `tract_weight` and `patch_gram`, used by `tract_conv2d` and `TrActConv2d` alike. Padding: int, pair,
    'same' (the extra pixel right/bottom, as torch pads) or 'valid'. Cached (a layer asks at every forward)."""
    kernel_size = tuple(weight_shape[2:])
    try:
        return _cached_geometry(kernel_size, stride, padding, dilation, groups, padding_mode)
    except TypeError:  # unhashable settings (lists): built, not cached
        return _cached_geometry.__wrapped__(kernel_size, stride, padding, dilation, groups, padding_mode)


@functools.lru_cache(maxsize=256)
def _cached_geometry(kernel_size: Tuple[int, ...], stride: _IntPair, padding: Union[str, _IntPair],
                     dilation: _IntPair, groups: int, padding_mode: str) -> ConvGeometry:
    dilation = _pair(dilation)
    return ConvGeometry(
        kernel_size=kernel_size,
        stride=_pair(stride),
        dilation=dilation,
        pad=_conv_pad(padding, kernel_size, dilation),
        padding_mode=padding_mode,
        groups=groups,
    )


def tract_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: _IntPair = 1,
        padding: Union[str, _IntPair] = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        tract_lambda: float = DEFAULT_LAMBDA,
        padding_mode: str = 'zeros',
        sync_gram: bool = False,
        tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
) -> torch.Tensor:
    """`F.conv2d` (same arguments and output) whose weight gradient is the TrAct gradient.

    Args:
        x: input (B, C_in, H, W) (or unbatched (C_in, H, W)).
        weight: (C_out, C_in/groups, kh, kw).
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular' as in nn.Conv2d (non-zero modes pad explicitly).
        sync_gram: all-reduce XᵀX and N over the default process group (global-batch TrAct under DDP).
        tract_lambda_mode: 'absolute' (XᵀX/N + λI, the paper) or 'relative' (λ times s = tr(XᵀX/N)/n).
    Returns:
        (B, C_out, H_out, W_out), bit-identical to the plain convolution.
    """
    tract_lambda = check_lambda(tract_lambda)
    tract_lambda_mode = check_lambda_mode(tract_lambda_mode)
    if x.dim() == 3:
        return tract_conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, tract_lambda,
                            padding_mode, sync_gram, tract_lambda_mode).squeeze(0)
    geom = conv_geometry(weight.shape, stride, padding, dilation, groups, padding_mode)
    w = tract_weight(weight, x, geom, tract_lambda, sync_gram, tract_lambda_mode)
    if padding_mode != 'zeros':
        return F.conv2d(F.pad(x, geom.pad, mode=padding_mode), w, bias, stride, 0, dilation, groups)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def tract_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        tract_lambda: float = DEFAULT_LAMBDA,
        sync_gram: bool = False,
        tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
) -> torch.Tensor:
    """`F.linear` (x (..., n) → (..., m)) whose weight gradient is the TrAct gradient (rows = all leading positions);
    `tract_lambda_mode` as in `tract_conv2d`."""
    tract_lambda = check_lambda(tract_lambda)
    tract_lambda_mode = check_lambda_mode(tract_lambda_mode)
    return F.linear(x, tract_weight(weight, x, None, tract_lambda, sync_gram, tract_lambda_mode), bias)
