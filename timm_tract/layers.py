""" TrAct layers: Conv2d / Linear that train with the TrAct first-layer gradient, and `apply_tract`.

Paper: "TrAct: Making First-layer Pre-Activations Trainable", Petersen, Borgelt, Ermon, NeurIPS 2024,
https://arxiv.org/abs/2410.23970

Each layer is its torch base class with one change: the weight gradient is Gᵀ X (XᵀX/N + λI)⁻¹ instead of GᵀX
(see `timm_tract.functional`). Forward, state dict, bias and input gradients are those of the base class, so TrAct
weights are plain timm weights. TorchScript: a scripted TrAct layer computes the plain forward and trains with
the ordinary gradient (the TrAct backward is a Python autograd Function that TorchScript cannot save).

`tract_lambda` and `tract_lambda_mode` are validated on every assignment (`layer.tract_lambda = -1` raises), and
`apply_tract` checks every layer it is asked to convert before it converts any: a call that raises leaves the model
as it was.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .errors import TrActArgumentError, TrActTypeError
from .functional import DEFAULT_LAMBDA, DEFAULT_LAMBDA_MODE, check_lambda, check_lambda_mode, conv_geometry, \
    tract_weight

__all__ = ['TrActConv2d', 'TrActLinear', 'apply_tract', 'remove_tract', 'is_tract_layer', 'find_first_layer']


def _get_lambda(self) -> float:
    state = self.__dict__
    if '_tract_lambda' in state:
        return state['_tract_lambda']
    if 'tract_lambda' in state:  # a layer pickled before λ became a validated property
        return state['tract_lambda']
    raise AttributeError('tract_lambda')


def _set_lambda(self, value: float) -> None:
    self._tract_lambda = check_lambda(value)


def _get_lambda_mode(self) -> str:
    return self.__dict__.get('_tract_lambda_mode', DEFAULT_LAMBDA_MODE)  # layers pickled before the mode: absolute


def _set_lambda_mode(self, value: str) -> None:
    self._tract_lambda_mode = check_lambda_mode(value)


def _tract_repr(self) -> str:
    return (f', tract_lambda={self.tract_lambda}'
            + (f", tract_lambda_mode='{self.tract_lambda_mode}'" if self.tract_lambda_mode != DEFAULT_LAMBDA_MODE
               else '')
            + (', sync_gram=True' if self.sync_gram else ''))


_LAMBDA_DOC = 'λ > 0 of the TrAct gradient (validated on assignment).'
_LAMBDA_MODE_DOC = ("'absolute' (XᵀX/N + λI, the paper) or 'relative' (λ·s, s = tr(XᵀX/N)/n); validated on "
                    "assignment.")


@register_notrace_module
class TrActConv2d(nn.Conv2d):
    """nn.Conv2d whose weight gradient is the TrAct gradient (every nn.Conv2d option; N = B·H_out·W_out rows)."""

    tract_lambda = property(_get_lambda, _set_lambda, doc=_LAMBDA_DOC)
    tract_lambda_mode = property(_get_lambda_mode, _set_lambda_mode, doc=_LAMBDA_MODE_DOC)
    __jit_unused_properties__ = ['tract_lambda', 'tract_lambda_mode']  # TorchScript: the scripted layer uses neither

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Union[int, Tuple[int, int]],
            stride: Union[int, Tuple[int, int]] = 1,
            padding: Union[str, int, Tuple[int, int]] = 0,
            dilation: Union[int, Tuple[int, int]] = 1,
            groups: int = 1,
            bias: bool = True,
            padding_mode: str = 'zeros',
            device=None,
            dtype=None,
            *,
            tract_lambda: float = DEFAULT_LAMBDA,
            sync_gram: bool = False,
            tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
    ):
        tract_lambda = check_lambda(tract_lambda)
        tract_lambda_mode = check_lambda_mode(tract_lambda_mode)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.tract_lambda = tract_lambda
        self.tract_lambda_mode = tract_lambda_mode
        self.sync_gram = bool(sync_gram)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self._tract_weight(x), self.bias)

    @torch.jit.unused
    def _tract_weight(self, x: torch.Tensor) -> torch.Tensor:
        geom = conv_geometry(
            self.weight.shape, self.stride, self.padding, self.dilation, self.groups, self.padding_mode)
        x4 = x.unsqueeze(0) if x.dim() == 3 else x
        return tract_weight(self.weight, x4, geom, self.tract_lambda, self.sync_gram, self.tract_lambda_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + _tract_repr(self)


@register_notrace_module
class TrActLinear(nn.Linear):
    """nn.Linear whose weight gradient is the TrAct gradient; input (..., in_features), N = all leading positions."""

    tract_lambda = property(_get_lambda, _set_lambda, doc=_LAMBDA_DOC)
    tract_lambda_mode = property(_get_lambda_mode, _set_lambda_mode, doc=_LAMBDA_MODE_DOC)
    __jit_unused_properties__ = ['tract_lambda', 'tract_lambda_mode']  # TorchScript: the scripted layer uses neither

    def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            device=None,
            dtype=None,
            *,
            tract_lambda: float = DEFAULT_LAMBDA,
            sync_gram: bool = False,
            tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
    ):
        tract_lambda = check_lambda(tract_lambda)
        tract_lambda_mode = check_lambda_mode(tract_lambda_mode)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.tract_lambda = tract_lambda
        self.tract_lambda_mode = tract_lambda_mode
        self.sync_gram = bool(sync_gram)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return nn.functional.linear(x, self.weight, self.bias)
        return nn.functional.linear(x, self._tract_weight(x), self.bias)

    @torch.jit.unused
    def _tract_weight(self, x: torch.Tensor) -> torch.Tensor:
        return tract_weight(self.weight, x, None, self.tract_lambda, self.sync_gram, self.tract_lambda_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + _tract_repr(self)


_TRACT_CLASS = {nn.Conv2d: TrActConv2d, nn.Linear: TrActLinear}
_BASE_CLASS = {v: k for k, v in _TRACT_CLASS.items()}


def is_tract_layer(module: nn.Module) -> bool:
    """True for a TrActConv2d / TrActLinear."""
    return isinstance(module, (TrActConv2d, TrActLinear))


def _first_conv_names(model: nn.Module) -> Tuple[str, ...]:
    """timm's record of the stem (`first_conv`: model traits, else pretrained_cfg; str or tuple), else ()."""
    traits = getattr(model, '_traits', None) or {}
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = traits.get('first_conv') or cfg.get('first_conv')
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


_LayerArg = Optional[Union[str, Sequence[str]]]


def _layer_names(model: nn.Module, layer: _LayerArg) -> Tuple[str, ...]:
    """The module paths `layer` names (default: timm's `first_conv`, else the first Conv2d/Linear); a TypeError naming
    `layer` unless it is None, a path or a list/tuple of paths."""
    if layer is None:
        names = _first_conv_names(model)
        if names:
            return names
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                return (name,)
        raise TrActArgumentError(
            f'{type(model).__name__} has no `first_conv` in its pretrained_cfg and no nn.Conv2d/nn.Linear layer; '
            f'pass layer="<module path>" to apply_tract.')
    names = (layer,) if isinstance(layer, str) else layer
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TrActTypeError(
            f'layer must be a module path (str) or a non-empty list/tuple of paths, got {type(layer).__name__} '
            f'{layer!r}; e.g. layer="conv1" (see model.named_modules()), or leave it None for the first layer.')
    return tuple(names)


def _named_first_layers(model: nn.Module, layer: _LayerArg) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every layer `layer` names, all resolved before anything is returned."""
    out = []
    for name in _layer_names(model, layer):
        name = name[:-len('.weight')] if name.endswith('.weight') else name
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise TrActArgumentError(
                f'Layer "{name}" does not exist in {type(model).__name__}; pass layer="<module path>" naming one of '
                f'its nn.Conv2d/nn.Linear modules (see model.named_modules()).') from None
        out.append((name, module))
    return out


def find_first_layer(model: nn.Module) -> Tuple[str, ...]:
    """Module path(s) `apply_tract` converts by default: timm's `first_conv` (tuple-aware) or the first Conv2d/Linear
    in module order."""
    return tuple(name for name, _ in _named_first_layers(model, None))


def apply_tract(
        model: nn.Module,
        tract_lambda: float = DEFAULT_LAMBDA,
        layer: _LayerArg = None,
        sync_gram: bool = False,
        tract_lambda_mode: str = DEFAULT_LAMBDA_MODE,
) -> nn.Module:
    """Make the model's first layer a TrAct layer, in place; returns the model.

    Args:
        model: any nn.Module (timm models record their stem in `pretrained_cfg['first_conv']`).
        tract_lambda: λ > 0, any real number (paper: 0.1 default, 0.05 short runs, 0.2 long runs, for inputs
            standardized to mean 0 / std 1).
        layer: module path (or list/tuple of paths) to convert; default timm's `first_conv`, else the first
            nn.Conv2d / nn.Linear in module order.
        sync_gram: under DDP, all-reduce XᵀX and N so every rank uses the global-batch statistics.
        tract_lambda_mode: 'absolute' (the paper's XᵀX/N + λI) or 'relative' (XᵀX/N + λ·s·I, s = tr(XᵀX/N)/n: λ
            independent of the input's units).

    The module object, its Parameters (an optimizer built before keeps working), hooks, device and dtype are kept:
    only its class changes to TrActConv2d / TrActLinear. A layer that is already TrAct gets the new λ, mode and
    sync_gram.
    Every argument and every named layer is checked first: a call that raises changes nothing.
    """
    tract_lambda = check_lambda(tract_lambda)
    tract_lambda_mode = check_lambda_mode(tract_lambda_mode)
    layers = _named_first_layers(model, layer)
    for name, module in layers:
        if not is_tract_layer(module) and type(module) not in _TRACT_CLASS:
            raise TrActTypeError(
                f'TrAct covers nn.Conv2d and nn.Linear layers, but "{name}" is {type(module).__module__}.'
                f'{type(module).__name__} (a subclass with its own forward, or another layer type). '
                f'Pass layer="<module path>" naming a plain nn.Conv2d/nn.Linear, or use TrActConv2d/TrActLinear '
                f'directly.')
    for _, module in layers:
        if not is_tract_layer(module):
            module.__class__ = _TRACT_CLASS[type(module)]
        module.tract_lambda = tract_lambda
        module.tract_lambda_mode = tract_lambda_mode
        module.sync_gram = bool(sync_gram)
    return model


def remove_tract(model: nn.Module) -> nn.Module:
    """Turn every TrAct layer of the model back into its plain nn.Conv2d / nn.Linear, in place; returns the model."""
    for module in model.modules():
        if type(module) in _BASE_CLASS:
            module.__class__ = _BASE_CLASS[type(module)]
            for attr in ('_tract_lambda', '_tract_lambda_mode', 'sync_gram'):
                module.__dict__.pop(attr, None)
    return model
