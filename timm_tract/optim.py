""" `tract-<base>` optimizers: timm's optimizer registry extended with "train the first layer with TrAct".

On import, every optimizer in timm's registry gets a TrAct twin named `tract-<base>` (`tract-sgd`, `tract-adamw`,
`tract-lamb`, ...; no `_` in the name, so `lookahead_tract-adamw` parses). Creating one:

1. finds the model that owns the parameter groups (timm hands an optimizer only parameters, never the model): the
   timm model around them (the module carrying timm's `first_conv` record, also inside a task wrapper), so a
   head-only or parameter-subset optimizer still points at the model's stem, never at the first layer it trains;
2. checks everything first: λ, the layer TrAct would use (the model's TrAct layers, else the `apply_tract` rule),
   that this optimizer trains that layer (else the documented "not trained by this optimizer" error), and builds the
   plain `<base>` optimizer with every other keyword (so its state_dict is `<base>`'s);
3. only then converts the first layer with `apply_tract`, in place and keeping the Parameter objects (the optimizer
   built in 2 keeps working), unless the model already has a TrAct layer (a `*_tract` model: never TrAct twice).
   A failed creation leaves the model as it was.

Keywords of the TrAct part (`--opt-kwargs tract_lambda=0.05 tract_sync_gram=True` in train.py): `tract_lambda`
(default: the model's own λ for a TrAct model, else 0.1) and `tract_sync_gram` (all-reduce XᵀX over DDP ranks).

Finding the model uses PyTorch's public global registration hooks
(`register_module_parameter_registration_hook`, `register_module_module_registration_hook`): two weak maps,
parameter → owning module and module → parent module, filled as models are built. The model is the innermost
ancestor of a parameter's owner that holds every parameter given to the optimizer. The hooks cost one weak-map
insert per registered parameter / submodule (see `scripts/bench_optim_hook.py`); nothing else runs unless a
`tract-*` optimizer is created (then, for parameters replaced after registration, e.g. by `to_empty()` of a meta-device
model, the recorded modules are searched for their owner). Models materialized without registration (deepcopy,
unpickling a whole model) are not tracked: build the optimizer on a model created normally, or call `apply_tract` and
use the plain optimizer.
"""
import dataclasses
import logging
import weakref
from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from .errors import TrActArgumentError
from .functional import DEFAULT_LAMBDA, check_lambda
from .layers import _first_conv_names, apply_tract, find_first_layer, is_tract_layer
from .naming import TRACT_OPT_PREFIX, TRACT_PAPER_ID

__all__ = ['TRACT_PREFIX', 'register_tract_optimizers', 'find_model_of_params', 'prepare_tract_model']

_logger = logging.getLogger(__name__)

TRACT_PREFIX = TRACT_OPT_PREFIX  # kept for callers of earlier versions

class _WeakIdMap:
    """obj -> weakref(target), keyed by identity (tensors have an elementwise __eq__); an entry vanishes with its key.

    Cheaper than `weakref.WeakKeyDictionary`/`torch.utils.weak.WeakIdKeyDictionary` (about 1 µs per insert), which
    matters because every parameter / submodule registration in the process goes through it.
    """

    def __init__(self) -> None:
        self._data: Dict[int, Tuple[weakref.ref, weakref.ref]] = {}

    def _drop(self, key: int, ref: weakref.ref) -> None:
        entry = self._data.get(key)
        if entry is not None and entry[0] is ref:
            del self._data[key]

    def set(self, obj: Any, target: Any) -> None:
        key = id(obj)
        self._data[key] = (weakref.ref(obj, partial(self._drop, key)), weakref.ref(target))

    def get(self, obj: Any) -> Optional[Any]:
        entry = self._data.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return None
        return entry[1]()

    def __len__(self) -> int:
        return len(self._data)

    def live_keys(self) -> List[Any]:
        return [obj for obj in (ref() for ref, _ in list(self._data.values())) if obj is not None]


_param_owner = _WeakIdMap()  # parameter -> module it was registered on (the latest one)
_module_parent = _WeakIdMap()  # module -> module it was registered in as a child (the latest one)


def _on_parameter_registration(module: nn.Module, name: str, param: nn.Parameter) -> None:
    _param_owner.set(param, module)


def _on_module_registration(parent: nn.Module, name: str, child: Optional[nn.Module]) -> None:
    if child is not None:
        _module_parent.set(child, parent)


_hook_handles = (
    register_module_parameter_registration_hook(_on_parameter_registration),
    register_module_module_registration_hook(_on_module_registration),
)


def _iter_group_params(params: List[Any]) -> Iterable[torch.Tensor]:
    for item in params:
        if isinstance(item, dict):
            group = item['params']
            group = [group] if isinstance(group, torch.Tensor) else group
            for p in group:
                yield p[1] if isinstance(p, tuple) else p
        else:
            yield item[1] if isinstance(item, tuple) else item


def _materialize(params: Any) -> List[Any]:
    """Parameters / groups as a list that can be read twice (a generator would be used up by the search)."""
    if isinstance(params, torch.Tensor):
        return [params]
    out = []
    for item in params:
        if isinstance(item, dict) and not isinstance(item['params'], (torch.Tensor, list)):
            item = {**item, 'params': list(item['params'])}
        out.append(item)
    return out


def _ancestors(module: nn.Module) -> Iterable[nn.Module]:
    seen = set()
    while module is not None and id(module) not in seen:
        seen.add(id(module))
        yield module
        module = _module_parent.get(module)


def _owner_among_tracked_modules(wanted: set) -> Optional[nn.Module]:
    """A tracked submodule directly holding one of the wanted parameters.

    For parameters replaced after registration without a hook call, e.g. by `Module.to_empty()` / `.to()` of a
    model built on the meta device (`_apply` then writes new Parameter objects into `_parameters`). Only looks at
    the modules the hooks recorded, only when a tract-* optimizer is created.
    """
    for module in _module_parent.live_keys():
        if any(id(p) in wanted for p in module.parameters(recurse=False)):
            return module
    return None


def _holder_of(params: Sequence[torch.Tensor]) -> Optional[nn.Module]:
    """The innermost registered module that holds every one of `params`, or None."""
    wanted = {id(p) for p in params}
    if not wanted:
        return None
    owner = next((o for o in map(_param_owner.get, params) if o is not None), None)
    if owner is None:
        owner = _owner_among_tracked_modules(wanted)
    if owner is None:
        return None
    for module in _ancestors(owner):
        if wanted <= {id(q) for q in module.parameters()}:
            return module
    return None


def find_model_of_params(params: Sequence[torch.Tensor]) -> Optional[nn.Module]:
    """The model whose first layer a `tract-*` optimizer over `params` makes TrAct; None if the parameters were never
    registered on a module (or belong to unrelated models).

    Starting from the innermost module holding every parameter (the classifier, when only the head is given), the
    model is the nearest enclosing module with timm's `first_conv` record; without one, a module with that record
    inside the outermost enclosing module (a task wrapper around a timm model), else the outermost module itself.
    """
    holder = _holder_of(params)
    if holder is None:
        return None
    chain = list(_ancestors(holder))
    model = next((m for m in chain if _first_conv_names(m)), None)
    if model is None:
        model = next((m for m in chain[-1].modules() if _first_conv_names(m)), chain[-1])
    return model


def _target_layers(model: nn.Module) -> List[nn.Module]:
    """The layers TrAct is (already) on, else those `apply_tract` would convert (not converted here)."""
    layers = [m for m in model.modules() if is_tract_layer(m)]
    return layers or [model.get_submodule(name) for name in find_first_layer(model)]


def prepare_tract_model(
        model: nn.Module,
        tract_lambda: Optional[float] = None,
        sync_gram: Optional[bool] = None,
) -> List[nn.Module]:
    """Make sure `model` trains its first layer with TrAct; returns its TrAct layers.

    A model without TrAct layer gets `apply_tract(model, tract_lambda or 0.1, sync_gram=...)`. A model that already
    has TrAct layers (a `*_tract` model, or `apply_tract` called before) keeps them; only an explicit `tract_lambda`
    / `sync_gram` is set on them (λ checked before any layer changes).
    """
    layers = [m for m in model.modules() if is_tract_layer(m)]
    if not layers:
        apply_tract(model, DEFAULT_LAMBDA if tract_lambda is None else tract_lambda, sync_gram=bool(sync_gram))
        return [m for m in model.modules() if is_tract_layer(m)]
    if tract_lambda is not None:
        tract_lambda = check_lambda(tract_lambda)
    for layer in layers:
        if tract_lambda is not None:
            layer.tract_lambda = tract_lambda
        if sync_gram is not None:
            layer.sync_gram = bool(sync_gram)
    return layers


def _create_tract_optimizer(
        params: Any,
        *,
        _base: str,
        tract_lambda: Optional[float] = None,
        tract_sync_gram: Optional[bool] = None,
        **kwargs: Any,
) -> torch.optim.Optimizer:
    """`opt_class` of a `tract-<base>` registry entry: check, build `<base>(params, **kwargs)`, then TrAct on the
    model owning `params` (validate first, convert last: a failure leaves the model unchanged)."""
    from timm.optim._optim_factory import default_registry
    if tract_lambda is not None:
        tract_lambda = check_lambda(tract_lambda)
    params = _materialize(params)
    tensors = list(_iter_group_params(params))
    model = find_model_of_params(tensors)
    name = TRACT_OPT_PREFIX + _base
    if model is None:
        raise TrActArgumentError(
            f'{name}: cannot find the model that owns the {len(tensors)} parameters given to the optimizer (they were '
            f'not registered on one nn.Module, e.g. a deepcopied or unpickled model, or parameters of several models). '
            f'Call timm_tract.apply_tract(model) and use the plain "{_base}" optimizer instead.')
    trained = {id(p) for p in tensors}
    frozen = [type(m).__name__ for m in _target_layers(model) if id(m.weight) not in trained]
    if frozen:
        raise TrActArgumentError(
            f'{name}: the first layer of {type(model).__name__} ({", ".join(frozen)}) is not trained by this optimizer '
            f'(frozen, or left out of the parameter groups), so TrAct would have no effect. Use "{_base}", or train '
            f'the first layer.')
    opt_class = default_registry.get_optimizer_class(_base, bind_defaults=False)
    optimizer = opt_class(params, **kwargs)
    layers = prepare_tract_model(model, tract_lambda, tract_sync_gram)
    _logger.info(
        f'{name}: TrAct on {type(model).__name__} first layer(s) '
        + ', '.join(f'{type(m).__name__}(tract_lambda={m.tract_lambda}, sync_gram={m.sync_gram})' for m in layers))
    return optimizer


def register_tract_optimizers() -> List[str]:
    """Register `tract-<base>` for every optimizer in timm's registry that has no TrAct twin yet; returns the new names.

    Runs on `import timm_tract`; call it again after registering optimizers of your own.
    """
    from timm.optim._optim_factory import default_registry
    existing = set(default_registry.list_optimizers())
    added = []
    for base in sorted(existing):
        name = TRACT_OPT_PREFIX + base
        if base.startswith(TRACT_OPT_PREFIX) or '_' in base or name in existing:
            continue  # '_' names cannot be reached through timm's name parser anyway
        info = default_registry.get_optimizer_info(base)
        default_registry.register(dataclasses.replace(
            info,
            name=name,
            opt_class=partial(_create_tract_optimizer, _base=base),
            description=f'TrAct first layer ({TRACT_PAPER_ID}) + {base}: {info.description}',
        ))
        added.append(name)
    return added


def _register_on_import() -> None:
    try:
        register_tract_optimizers()
    except (ImportError, AttributeError) as e:  # timm moved its registry: models keep working, tests fail loudly
        _logger.warning(f'timm-tract: could not register tract-* optimizers in timm\'s optimizer registry ({e!r}).')


_register_on_import()
