""" Helpers of the training-stack tests (tasks, Muon, layer decay, FSDP2, sizes): tiny seeded timm models, their
first layer, parameter groups, random batches, model snapshots, and the float64 TrAct formula as the reference. """
from typing import List, Tuple, Union

import timm
import torch
import torch.nn as nn

from timm_tract import is_tract_layer

NUM_CLASSES = 3
LAMBDA = 0.1  # timm-tract's default λ


def tiny_model(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    """`timm.create_model(arch, num_classes=3, **kwargs)` from `torch.manual_seed(seed)`, no pretrained weights."""
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def first_layer(model: nn.Module) -> nn.Module:
    """The layer timm's `first_conv` names."""
    return model.get_submodule(model.pretrained_cfg['first_conv'])


def tract_layers(module: nn.Module):
    return [m for m in module.modules() if is_tract_layer(m)]


def group_of(opt: Union[torch.optim.Optimizer, List[dict]], param: torch.Tensor) -> dict:
    """The one parameter group of `opt` (an optimizer, or a list of groups) holding `param`."""
    groups = opt.param_groups if isinstance(opt, torch.optim.Optimizer) else opt
    group, = [g for g in groups if any(p is param for p in g['params'])]
    return group


def random_batch(seed: int, batch_size: int = 4, img_size: int = 32,
                 dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, H, H) with mean 0.5 / std 2, labels (B,)) from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g, dtype=dtype) * 2 + 0.5
    return x, torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)


def snapshot(module: nn.Module):
    """Everything a failed optimizer creation must leave as it was: state, requires_grad flags, module classes."""
    return ({k: v.clone() for k, v in module.state_dict().items()}, [p.requires_grad for p in module.parameters()],
            [type(m) for m in module.modules()])


def assert_unchanged(module: nn.Module, before) -> None:
    state, flags, types = snapshot(module)
    assert flags == before[1] and types == before[2]
    assert state.keys() == before[0].keys() and all(torch.equal(before[0][k], v) for k, v in state.items())


def patch_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The unfolded input patches of `conv` on x, (N = B·H_out·W_out, n = C·kh·kw) in the weight's column order."""
    cols = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def tract_formula(plain_grad: torch.Tensor, rows: torch.Tensor, tract_lambda: float = LAMBDA) -> torch.Tensor:
    """The TrAct weight gradient from the plain one: plain_grad (m, ...) · (XᵀX/N + λI)⁻¹ for rows X (N, n)."""
    a = rows.T @ rows / rows.shape[0] + tract_lambda * torch.eye(rows.shape[1], dtype=rows.dtype)
    m = plain_grad.shape[0]
    return torch.linalg.solve(a, plain_grad.reshape(m, -1).T).T.reshape(plain_grad.shape)


def stem_freezing_scale(model: nn.Module, **layer_decay_kwargs) -> float:
    """A `layer_decay_no_opt_scale` between the first layer's lr scale and the next larger one (timm's layer-decay
    groups for `layer_decay_kwargs`, e.g. layer_decay=0.5): it freezes the first layer's group only."""
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, **layer_decay_kwargs)
    stem = group_of(groups, first_layer(model).weight)['lr_scale']
    return (stem + min(g['lr_scale'] for g in groups if g['lr_scale'] > stem)) / 2
