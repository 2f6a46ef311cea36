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
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ['tract_conv2d', 'tract_linear', 'patch_gram', 'conv_geometry', 'tract_precondition', 'check_lambda',
           'DEFAULT_LAMBDA']

DEFAULT_LAMBDA = 0.1

# Budget of one unfolded chunk in elements (fp32: 8 MiB, one 224 px ResNet-stem image), so the extra memory of the
# Gram is small and fixed, whatever the batch size.
_CHUNK_ELEMENTS = 1 << 21
_SYMMETRIC_MIN_N = 384

_IntPair = Union[int, Tuple[int, int]]


def _pair(v: _IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def check_lambda(tract_lambda: float) -> float:
    """Return `tract_lambda` as float; raise ValueError unless it is finite and > 0."""
    if isinstance(tract_lambda, bool) or not isinstance(tract_lambda, (int, float)):
        raise TypeError(f'tract_lambda must be a positive float, got {type(tract_lambda).__name__} {tract_lambda!r}.')
    if not math.isfinite(tract_lambda) or tract_lambda <= 0:
        raise ValueError(
            f'tract_lambda must be finite and > 0, got {tract_lambda!r}. '
            f'Use the paper default 0.1 (0.05 for short runs, 0.2 for long runs).')
    return float(tract_lambda)


@dataclass(frozen=True)
class _ConvGeometry:
    """How a conv layer cuts its input into patches: explicit (left, right, top, bottom) padding, padding mode."""
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


def _conv_out_size(x: torch.Tensor, geom: _ConvGeometry) -> Tuple[int, int]:
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


def _conv_patch_stats(x: torch.Tensor, geom: _ConvGeometry, keep_rows: bool) -> Tuple[torch.Tensor, int]:
    """Patch statistics of a conv input x (B, C, H, W).

    Returns (S, N): N = B·H_out·W_out patch rows; S = XᵀX (groups, n, n) summed over rows, in float32 (float64 for
    float64 input), accumulated one bounded chunk of images/rows at a time; or, with `keep_rows`, the patch matrix X
    itself (groups, N, n) in float64 (only used when N < n: smaller than XᵀX, and its N×N system is solved in float64).
    """
    dtype = torch.float64 if keep_rows else _gram_dtype(x.dtype)
    batch, chans = x.shape[:2]
    g = geom.groups
    cg = chans // g
    n = cg * geom.kernel_size[0] * geom.kernel_size[1]
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    pad_mode = 'constant' if geom.padding_mode == 'zeros' else geom.padding_mode
    w = x.shape[3] + geom.pad[0] + geom.pad[1]
    h_out, w_out = _conv_out_size(x, geom)
    num_rows = batch * h_out * w_out
    if keep_rows:
        out = x.new_empty((g, num_rows, n), dtype=dtype)
    else:
        out = x.new_zeros((g, n, n), dtype=dtype)
    if num_rows == 0:
        return out, 0
    shifted = None
    row_elements = n * g * w_out  # materialized elements per output row of one image
    if not keep_rows and _uses_shifted_gram(geom):
        shifted = _ShiftedGram(chans, geom.kernel_size, geom.stride, w, dtype, x.device)
        row_elements = shifted.m * shifted.t_max
    # chunk = whole images while they fit the budget, else bands of output rows of one image
    per_image = row_elements * h_out
    images_per_chunk = max(1, _CHUNK_ELEMENTS // per_image)
    rows_per_band = h_out if per_image <= _CHUNK_ELEMENTS else max(1, _CHUNK_ELEMENTS // row_elements)
    row = 0
    for b0 in range(0, batch, images_per_chunk):
        xb = x[b0:b0 + images_per_chunk].to(dtype=dtype, memory_format=torch.contiguous_format)
        if any(geom.pad):
            xb = F.pad(xb, geom.pad, mode=pad_mode)
        for r0 in range(0, h_out, rows_per_band):
            r = min(rows_per_band, h_out - r0)
            band = xb[:, :, r0 * sh: r0 * sh + (r - 1) * sh + dh * (kh - 1) + 1]
            if keep_rows:
                cols = F.unfold(band, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)
                rows = cols.view(cols.shape[0], g, n, -1).permute(1, 0, 3, 2).reshape(g, -1, n)
                out[:, row:row + rows.shape[1]] = rows
                row += rows.shape[1]
            elif shifted is not None:
                shifted.add(band)
            else:
                cols = F.unfold(band, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)
                _accumulate_gram(out, cols.view(cols.shape[0], g, n, -1))  # (b, g, n, L)
    if keep_rows:
        return out, num_rows
    return (shifted.gram()[None] if shifted is not None else _mirror_gram(out)), num_rows


def _uses_shifted_gram(geom: _ConvGeometry) -> bool:
    """Overlapping patches along the width (kw > sw), no dilation, one group: `_shifted_gram` does fewer flops."""
    return geom.groups == 1 and geom.dilation == (1, 1) and geom.kernel_size[1] > geom.stride[1]


class _ShiftedGram:
    """Exact XᵀX (n, n) of the patches of padded inputs (b, C, H, W) (no dilation, one group), accumulated chunk by
    chunk without unfolding the kh·kw patches.

    With column j = sw·u + a (phase a < sw, shift u < U = ceil(kw/sw)), patch entry (c, i, j) at output (p, q) is
    V[b, p, q + u][c, i, a] with V[b, p, t][c, i, a] = xp[b, c, sh·p + i, sw·t + a]: only this vertical unfold V
    (C·kh·sw columns, about sw·U/kw of the full unfold's kw) is materialized, one chunk at a time. For δ = u - u' ≥ 0
    the (u, u') block is Σ_{t=u'}^{u'+W_out-1} V[t+δ]ᵀV[t] = M_δ - Σ_{t<u'} E(δ,t) + Σ_{t=W_out}^{W_out+u'-1} E(δ,t),
    with M_δ = Σ_{t<W_out} V[t+δ]ᵀV[t] (U GEMMs over all rows: U·(C·kh·sw)² instead of (C·kh·kw)² flops per row,
    e.g. 4·42² = 7056 vs 147² = 21609 for the 7×7 stride-2 ResNet stem)
    and E(δ,t) = Σ_{b,p} V[t+δ]ᵀV[t] a few edge terms; blocks with u < u' are transposes.
    """

    def __init__(self, chans: int, kernel_size: Tuple[int, int], stride: Tuple[int, int], w_in: int, dtype, device):
        (self.kh, self.kw), (self.sh, self.sw) = kernel_size, stride
        self.chans = chans
        self.w_out = (w_in - self.kw) // self.sw + 1
        self.shifts = -(-self.kw // self.sw)  # U
        self.t_max = self.w_out + self.shifts - 1
        self.m = chans * self.kh * self.sw
        # edge pairs (δ, t): t < U-1 or W_out <= t < W_out+U-1, t+δ < T
        self.edges = [(d, t) for d in range(self.shifts) for t in
                      list(range(self.shifts - 1)) + list(range(self.w_out, self.w_out + self.shifts - 1))
                      if t + d < self.t_max]
        self.main = torch.zeros((self.shifts, self.m, self.m), dtype=dtype, device=device)
        self.edge = torch.zeros((len(self.edges), self.m, self.m), dtype=dtype, device=device)

    def add(self, xp: torch.Tensor) -> None:
        """Accumulate the patches of xp (b, C, H, W), already padded, H covering whole output rows."""
        b = xp.shape[0]
        h_out = (xp.shape[2] - self.kh) // self.sh + 1
        width = self.sw * self.t_max
        xp = xp[:, :, :self.sh * (h_out - 1) + self.kh, :width]  # rows/columns no patch reaches
        if xp.shape[3] < width:  # columns only phantom taps j ≥ kw reach (dropped in `gram`)
            xp = F.pad(xp, (0, width - xp.shape[3]))
        v = xp.reshape(b, self.chans, xp.shape[2], self.t_max, self.sw).unfold(2, self.kh, self.sh)
        v = v.permute(0, 2, 3, 1, 5, 4).reshape(-1, self.m)  # rows (b, p, t), columns (c, i, a)
        blocks, t_max, m = b * h_out, self.t_max, self.m
        length = v.shape[0] - (self.shifts - 1)
        v3 = v.view(blocks, t_max, m)
        # right operand: rows with t ≥ W_out zeroed, so the flat products below sum exactly over the windows t < W_out
        # (a left row r + d may run into the next block: it is multiplied by such a zero row)
        window = v3.clone()
        window[:, self.w_out:] = 0
        window = window.view(-1, m)[:length]
        for d in range(self.shifts):
            self.main[d].addmm_(v[d:d + length].T, window)
        if self.edges:
            left = torch.stack([v3[:, t + d] for d, t in self.edges])  # (P, blocks, m)
            right = torch.stack([v3[:, t] for _, t in self.edges])
            self.edge.baddbmm_(left.transpose(1, 2), right)

    def gram(self) -> torch.Tensor:
        """The accumulated XᵀX (n, n), n = C·kh·kw in the weight's (c, i, j) order."""
        u_count, w_out = self.shifts, self.w_out
        edge = {key: self.edge[k] for k, key in enumerate(self.edges)}
        gram4 = self.main.new_empty((self.m, u_count, self.m, u_count))  # [(c, i, a), u, (c', i', a'), u']
        for d in range(u_count):
            for u_prime in range(u_count - d):
                block = self.main[d].clone()
                for t in range(u_prime):
                    block += edge[(d, w_out + t)] - edge[(d, t)]
                gram4[:, u_prime + d, :, u_prime] = block
                gram4[:, u_prime, :, u_prime + d] = block.T
        j = torch.arange(self.kw, device=gram4.device)  # (c, i, a, u) -> (c, i, j = sw·u + a), no phantom taps
        index = ((torch.arange(self.chans * self.kh, device=j.device)[:, None] * self.sw + j % self.sw) * u_count
                 + j // self.sw).reshape(-1)
        return gram4.reshape(self.m * u_count, -1)[index][:, index]


def _linear_patch_stats(x: torch.Tensor, keep_rows: bool) -> Tuple[torch.Tensor, int]:
    """As `_conv_patch_stats` for a Linear input x (..., n): rows are all leading positions; groups = 1."""
    dtype = _gram_dtype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    num_rows, n = rows.shape
    if keep_rows:
        return rows.to(torch.float64).unsqueeze(0), num_rows
    gram = x.new_zeros((1, n, n), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for r0 in range(0, num_rows, step):
        chunk = rows[r0:r0 + step].to(dtype)
        gram[0].addmm_(chunk.T, chunk)
    return gram, num_rows


def patch_gram(x: torch.Tensor, geom: Optional[_ConvGeometry] = None) -> Tuple[torch.Tensor, int]:
    """XᵀX of the unfolded input, (groups, n, n) float32/64, summed (not averaged) over the N rows; returns (XᵀX, N).

    `geom` None means a Linear layer (x (..., n)); otherwise a conv input x (B, C, H, W).
    """
    if geom is None:
        return _linear_patch_stats(x, keep_rows=False)
    return _conv_patch_stats(x, geom, keep_rows=False)


def _raise_if_not_pd(info: torch.Tensor, system: torch.Tensor) -> None:
    """Fail loudly (not with NaN weights) when the TrAct system is not positive definite."""
    if system.device.type == 'meta':
        return
    ok = (info == 0).all() & torch.isfinite(system).all()
    msg = ('TrAct: the system XᵀX/N + λI is not positive definite (non-finite values in the first layer input or '
           'its gradient?). Check the input batch for NaN/Inf, or raise tract_lambda.')
    if torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise RuntimeError(msg)


def tract_precondition(
        grad_w: torch.Tensor,
        stats: torch.Tensor,
        num_rows: int,
        tract_lambda: float,
        rows_form: bool = False,
) -> torch.Tensor:
    """Apply (XᵀX/N + λI)⁻¹ from the right to an ordinary weight gradient.

    Args:
        grad_w: ordinary gradient GᵀX, (m, n) viewed per group as (groups, m/groups, n); any float dtype.
        stats: XᵀX (groups, n, n) summed over rows, or with `rows_form` the rows X (groups, N, n) (Woodbury, N < n).
        num_rows: N, the number of patch rows.
        tract_lambda: λ > 0.
    Returns:
        The TrAct gradient, shape and dtype of `grad_w`.
    """
    g, n = stats.shape[0], stats.shape[-1]
    p = grad_w.reshape(g, -1, n).to(stats.dtype)  # (g, m_g, n)
    if rows_form:
        # P (XᵀX/N + λI)⁻¹ = (P - (P Xᵀ) (NλI + XXᵀ)⁻¹ X) / λ
        rows = stats
        k = torch.matmul(rows, rows.transpose(1, 2))
        k.diagonal(dim1=1, dim2=2).add_(num_rows * tract_lambda)
        chol, info = torch.linalg.cholesky_ex(k)
        _raise_if_not_pd(info, k)
        y = torch.cholesky_solve(torch.matmul(rows, p.transpose(1, 2)), chol)  # (g, N, m_g)
        out = (p - torch.matmul(y.transpose(1, 2), rows)) / tract_lambda
    else:
        a = stats / max(num_rows, 1)
        a.diagonal(dim1=1, dim2=2).add_(tract_lambda)
        chol, info = torch.linalg.cholesky_ex(a)
        _raise_if_not_pd(info, a)
        out = torch.cholesky_solve(p.transpose(1, 2), chol).transpose(1, 2)  # A symmetric: P A⁻¹ = (A⁻¹ Pᵀ)ᵀ
    return out.reshape(grad_w.shape).to(grad_w.dtype)


def _sync_gram(gram: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, int]:
    """All-reduce XᵀX and N over the default process group (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return gram, num_rows
    count = torch.tensor([float(num_rows)], dtype=gram.dtype, device=gram.device)
    flat = torch.cat([gram.reshape(-1), count])
    dist.all_reduce(flat)
    return flat[:-1].view_as(gram), int(round(flat[-1].item()))


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _TrActWeightGrad(torch.autograd.Function):
    """Identity on the weight in forward; in backward turns the ordinary weight gradient into the TrAct gradient.

    The patch statistics come from `x` (the layer input, detached) at backward time, so nothing beyond what the layer
    saves anyway is kept alive, and no work is done when no backward happens.
    """

    @staticmethod
    def forward(ctx, weight, x, geom, tract_lambda, sync_gram):
        ctx.save_for_backward(x)
        ctx.geom, ctx.tract_lambda, ctx.sync_gram = geom, tract_lambda, sync_gram
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_w):
        if grad_w is None:
            return None, None, None, None, None
        x, = ctx.saved_tensors
        n = grad_w[0].numel()  # C_in/groups·kh·kw (conv) or in_features (linear)
        num_rows = x[..., 0].numel() if ctx.geom is None else x.shape[0] * math.prod(_conv_out_size(x, ctx.geom))
        rows_form = num_rows < n and not ctx.sync_gram
        with _autocast_off(x.device.type):  # backward may run inside the caller's autocast region
            if ctx.geom is None:
                stats, num_rows = _linear_patch_stats(x, keep_rows=rows_form)
            else:
                stats, num_rows = _conv_patch_stats(x, ctx.geom, keep_rows=rows_form)
            if ctx.sync_gram:
                stats, num_rows = _sync_gram(stats, num_rows)
            grad = tract_precondition(grad_w, stats, num_rows, ctx.tract_lambda, rows_form)
        return grad, None, None, None, None


def _tract_weight(weight: torch.Tensor, x: torch.Tensor, geom, tract_lambda: float, sync_gram: bool) -> torch.Tensor:
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight
    return _TrActWeightGrad.apply(weight, x.detach(), geom, tract_lambda, sync_gram)


def conv_geometry(
        weight_shape: Sequence[int],
        stride: _IntPair = 1,
        padding: Union[str, _IntPair] = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        padding_mode: str = 'zeros',
) -> _ConvGeometry:
    """How a conv with weight (C_out, C_in/groups, kh, kw) and these nn.Conv2d settings cuts its input into patches
    (the `geom` of `patch_gram`)."""
    kernel_size = tuple(weight_shape[2:])
    dilation = _pair(dilation)
    return _ConvGeometry(
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
) -> torch.Tensor:
    """`F.conv2d` (same arguments and output) whose weight gradient is the TrAct gradient.

    Args:
        x: input (B, C_in, H, W) (or unbatched (C_in, H, W)).
        weight: (C_out, C_in/groups, kh, kw).
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular' as in nn.Conv2d (non-zero modes pad explicitly).
        sync_gram: all-reduce XᵀX and N over the default process group (global-batch TrAct under DDP).
    Returns:
        (B, C_out, H_out, W_out), bit-identical to the plain convolution.
    """
    tract_lambda = check_lambda(tract_lambda)
    if x.dim() == 3:
        return tract_conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, tract_lambda,
                            padding_mode, sync_gram).squeeze(0)
    geom = conv_geometry(weight.shape, stride, padding, dilation, groups, padding_mode)
    w = _tract_weight(weight, x, geom, tract_lambda, sync_gram)
    if padding_mode != 'zeros':
        return F.conv2d(F.pad(x, geom.pad, mode=padding_mode), w, bias, stride, 0, dilation, groups)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def tract_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        tract_lambda: float = DEFAULT_LAMBDA,
        sync_gram: bool = False,
) -> torch.Tensor:
    """`F.linear` (x (..., n) → (..., m)) whose weight gradient is the TrAct gradient (rows = all leading positions)."""
    tract_lambda = check_lambda(tract_lambda)
    return F.linear(x, _tract_weight(weight, x, None, tract_lambda, sync_gram), bias)
