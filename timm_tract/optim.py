""" `tract-<base>` optimizers: timm's optimizer registry extended with "train the first layer with TrAct".

On import, every optimizer in timm's registry gets a TrAct twin named `tract-<base>` (`tract-sgd`, `tract-adamw`,
`tract-lamb`, ...; no `_` in the name, so `lookahead_tract-adamw` parses). Creating one:

1. finds the model that owns the parameter groups (timm hands an optimizer only parameters, never the model): the
   timm model around them (the module carrying timm's `first_conv` record), so a head-only or parameter-subset
   optimizer still points at the model's stem, never at the first layer it trains. Inside a timm task
   (`timm.task`: classification, multi-label, logit / feature / token distillation) it is the student, also behind
   `FeatureDistillationTrainableModule(student, projection)`; never a distillation teacher (parameters of a teacher
   given to the optimizer, or of several timm models, are refused);
2. checks everything first: λ, the layer TrAct would use (the model's TrAct layers, else the `apply_tract` rule),
   that this optimizer trains that layer (else the documented "not trained by this optimizer" error, or, when timm's
   layer-wise lr decay froze it below `layer_decay_no_opt_scale`, an error saying so), and builds the plain `<base>`
   optimizer with every other keyword (so its state_dict is `<base>`'s). The Muon family (`muon`, `nmuon`,
   `adamuon`, `nadamuon`: timm's `Muon`) gets the TrAct layer's weight in a `use_fallback=True` group of its own
   (what timm's `fallback_list` builds, same options as its group): Newton-Schulz orthogonalization would discard
   TrAct's preconditioning, the AdamW / NAdamW fallback keeps it;
3. only then converts the first layer with `apply_tract`, in place and keeping the Parameter objects (the optimizer
   built in 2 keeps working), unless the model already has a TrAct layer (a `*_tract` model: never TrAct twice).
   A failed creation leaves the model as it was (also the `requires_grad` flags timm's layer-decay schedule had
   cleared for these groups are given back).

Keywords of the TrAct part (`--opt-kwargs tract_lambda=0.05 tract_sync_gram=True` in train.py): `tract_lambda`
(default: the model's own λ for a TrAct model, else 0.1), `tract_lambda_mode` ('absolute', the paper's, or 'relative':
λ scaled by the mean second moment of the patch entries) and `tract_sync_gram` (all-reduce XᵀX over DDP / FSDP ranks).

Finding the model uses PyTorch's public global registration hooks
(`register_module_parameter_registration_hook`, `register_module_module_registration_hook`): two weak maps,
parameter → owning module and module → parent module, filled as models are built. The model is the innermost
ancestor of a parameter's owner that holds every parameter given to the optimizer. The hooks cost one weak-map
insert per registered parameter / submodule (see `scripts/bench_optim_hook.py`); nothing else runs unless a
`tract-*` optimizer is created (then, for parameters replaced after registration, e.g. by `to_empty()` of a meta-device
model or by FSDP2's `fully_shard`, the recorded modules are searched for their owner). Models materialized without
registration (deepcopy, unpickling a whole model) are not tracked: build the optimizer on a model created normally, or
call `apply_tract` and use the plain optimizer.

To tell a stem frozen by the layer-decay schedule from one frozen by the user, timm's `param_groups_layer_decay` is
called through a wrapper (installed on import in `timm.optim._optim_factory`, where `create_optimizer` calls it) that
notes which parameters the call froze; it changes nothing else.
"""
import dataclasses
import functools
import logging
import threading
import weakref
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from .errors import TrActArgumentError
from .functional import DEFAULT_LAMBDA, DEFAULT_LAMBDA_MODE, check_lambda, check_lambda_mode
from .layers import _first_conv_names, apply_tract, find_first_layer, is_tract_layer
from .naming import TRACT_OPT_PREFIX, TRACT_PAPER_ID

__all__ = ['register_tract_optimizers', 'find_model_of_params', 'prepare_tract_model']

_logger = logging.getLogger(__name__)


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


def _as_tensor(item: Any) -> torch.Tensor:
    """A parameter as given to an optimizer: the tensor itself, or a (name, tensor) pair."""
    return item[1] if isinstance(item, tuple) else item


def _group_members(group: Dict[str, Any]) -> List[Any]:
    members = group['params']
    return [members] if isinstance(members, torch.Tensor) else list(members)


def _iter_group_params(params: List[Any]) -> Iterable[torch.Tensor]:
    for item in params:
        members = _group_members(item) if isinstance(item, dict) else [item]
        yield from map(_as_tensor, members)


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

    For parameters replaced after registration without a hook call: `Module.to_empty()` / `.to()` of a model built
    on the meta device (`_apply` writes new Parameter objects into `_parameters`), and FSDP2's `fully_shard`, which
    swaps in its sharded DTensor Parameters with `module._parameters[name] = ...`. Only looks at the modules the
    hooks recorded, only when a tract-* optimizer is created.
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


def _holds_any(module: nn.Module, wanted: set) -> bool:
    return any(id(p) in wanted for p in module.parameters())


def _timm_models_in(root: nn.Module) -> List[nn.Module]:
    """The outermost modules in `root` (itself included) that carry timm's `first_conv` record."""
    found, prefixes = [], []
    for path, module in root.named_modules():
        if any(path.startswith(prefix) for prefix in prefixes):
            continue
        if _first_conv_names(module):
            found.append(module)
            prefixes.append(path + '.' if path else '')
    return found


def _below_task(chain: List[nn.Module]) -> nn.Module:
    """In `chain` (a module, then its ancestors), the outermost module below a timm `TrainingTask` (the task's
    trainable module: a task also holds the teacher and the criterion), else the outermost module."""
    from timm.task import TrainingTask
    for i, module in enumerate(chain):
        if isinstance(module, TrainingTask):
            return chain[max(i - 1, 0)]
    return chain[-1]


def _refuse_teacher_params(outermost: nn.Module, wanted: set) -> None:
    """A `TrActArgumentError` if a timm `DistillationTeacher` inside `outermost` holds one of the wanted parameters."""
    from timm.task import DistillationTeacher
    for path, module in outermost.named_modules():
        if isinstance(module, DistillationTeacher) and _holds_any(module, wanted):
            raise TrActArgumentError(
                f'the parameters given to the optimizer include those of the distillation teacher '
                f'"{path or type(module).__name__}" ({type(module.model).__name__}); TrAct trains the student\'s '
                f'first layer and a teacher stays frozen: build the optimizer over task.get_trainable_module().')


def find_model_of_params(params: Sequence[torch.Tensor]) -> Optional[nn.Module]:
    """The model whose first layer a `tract-*` optimizer over `params` makes TrAct; None if the parameters were never
    registered on a module (or belong to unrelated models).

    Starting from the innermost module holding every parameter (the classifier, when only the head is given), the
    model is the nearest enclosing module with timm's `first_conv` record. Without one (a wrapper such as timm's
    `FeatureDistillationTrainableModule(student, projection)`), it is the timm model holding some of the parameters
    inside the outermost enclosing module below a timm task (the task's trainable module, never its teacher), else
    that module itself. Raises `TrActArgumentError` when the parameters include a distillation teacher's, or belong
    to several timm models.
    """
    holder = _holder_of(params)
    if holder is None:
        return None
    wanted = {id(p) for p in params}
    chain = list(_ancestors(holder))
    _refuse_teacher_params(chain[-1], wanted)
    model = next((m for m in chain if _first_conv_names(m)), None)
    if model is not None:
        return model
    root = _below_task(chain)
    models = [m for m in _timm_models_in(root) if _holds_any(m, wanted)]
    if len(models) > 1:
        raise TrActArgumentError(
            f'the parameters given to the optimizer belong to {len(models)} timm models '
            f'({", ".join(type(m).__name__ for m in models)}), so the first layer to train with TrAct is ambiguous: '
            f'give the optimizer one model\'s parameters, or call timm_tract.apply_tract on the model you mean and '
            f'use the plain optimizer.')
    return models[0] if models else root


def _target_layers(model: nn.Module) -> List[nn.Module]:
    """The layers TrAct is (already) on, else those `apply_tract` would convert (not converted here)."""
    layers = [m for m in model.modules() if is_tract_layer(m)]
    return layers or [model.get_submodule(name) for name in find_first_layer(model)]


def prepare_tract_model(
        model: nn.Module,
        tract_lambda: Optional[float] = None,
        sync_gram: Optional[bool] = None,
        tract_lambda_mode: Optional[str] = None,
) -> List[nn.Module]:
    """Make sure `model` trains its first layer with TrAct; returns its TrAct layers.

    A model without TrAct layer gets `apply_tract(model, tract_lambda or 0.1, sync_gram=..., tract_lambda_mode=...)`.
    A model that already has TrAct layers (a `*_tract` model, or `apply_tract` called before) keeps them; only an
    explicit `tract_lambda` / `sync_gram` / `tract_lambda_mode` is set on them (checked before any layer changes).
    """
    layers = [m for m in model.modules() if is_tract_layer(m)]
    if not layers:
        apply_tract(model, DEFAULT_LAMBDA if tract_lambda is None else tract_lambda, sync_gram=bool(sync_gram),
                    tract_lambda_mode=tract_lambda_mode or DEFAULT_LAMBDA_MODE)
        return [m for m in model.modules() if is_tract_layer(m)]
    if tract_lambda is not None:
        tract_lambda = check_lambda(tract_lambda)
    if tract_lambda_mode is not None:
        tract_lambda_mode = check_lambda_mode(tract_lambda_mode)
    for layer in layers:
        if tract_lambda is not None:
            layer.tract_lambda = tract_lambda
        if tract_lambda_mode is not None:
            layer.tract_lambda_mode = tract_lambda_mode
        if sync_gram is not None:
            layer.sync_gram = bool(sync_gram)
    return layers


# --- layer-wise lr decay: which parameters timm's schedule froze in the call that built these groups --------------

_layer_decay_record = threading.local()  # .last = (id of the groups list, ids of its groups, weakrefs of frozen)


def _recording(param_groups_layer_decay: Callable[..., List[Dict[str, Any]]]) -> Callable[..., List[Dict[str, Any]]]:
    """timm's `param_groups_layer_decay`, also noting the parameters it froze (`requires_grad = False` below
    `no_opt_scale`), so a failing `tract-*` creation can give them back and say why its first layer is frozen."""

    @functools.wraps(param_groups_layer_decay)
    def param_groups_layer_decay_recorded(model: nn.Module, *args: Any, **kwargs: Any) -> List[Dict[str, Any]]:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups_layer_decay(model, *args, **kwargs)
        frozen = [weakref.ref(p) for p in trainable if not p.requires_grad]
        _layer_decay_record.last = (id(groups), tuple(map(id, groups)), frozen)
        return groups

    param_groups_layer_decay_recorded._tract_recorder = True
    return param_groups_layer_decay_recorded


def _install_layer_decay_recorder() -> None:
    import timm.optim._optim_factory as factory  # create_optimizer calls it by this module-level name
    if not getattr(factory.param_groups_layer_decay, '_tract_recorder', False):
        factory.param_groups_layer_decay = _recording(factory.param_groups_layer_decay)


def _frozen_by_layer_decay(params: Any) -> List[torch.Tensor]:
    """Parameters timm's layer-decay schedule froze while building `params` (the very list it returned), else []."""
    record = getattr(_layer_decay_record, 'last', None)
    if record is None or not isinstance(params, list) or id(params) != record[0] \
            or tuple(map(id, params)) != record[1]:
        return []
    _layer_decay_record.last = None
    return [p for p in (ref() for ref in record[2]) if p is not None]


# --- checks and the Muon family ----------------------------------------------------------------------------------

def _check_trained(
        name: str, base: str, model: nn.Module, layers: List[nn.Module], tensors: List[torch.Tensor],
        frozen_by_schedule: List[torch.Tensor],
) -> None:
    trained = {id(p) for p in tensors}
    untrained = [m for m in layers if id(m.weight) not in trained]
    if not untrained:
        return
    what = f'the first layer of {type(model).__name__} ({", ".join(type(m).__name__ for m in untrained)})'
    if any(p is m.weight for m in untrained for p in frozen_by_schedule):
        raise TrActArgumentError(
            f'{name}: layer-wise lr decay froze {what} (its lr scale is below layer_decay_no_opt_scale), so TrAct '
            f'would have no effect. Keep it trained: lower or drop layer_decay_no_opt_scale '
            f'(train.py --layer-decay-no-opt-scale), or set layer_decay_min_scale >= layer_decay_no_opt_scale; '
            f'or use "{base}". The model is left as it was (requires_grad restored).')
    raise TrActArgumentError(
        f'{name}: {what} is not trained by this optimizer (frozen, or left out of the parameter groups), so TrAct '
        f'would have no effect. Use "{base}", or train the first layer.')


def _check_not_sharded_alone(name: str, base: str, layers: List[nn.Module]) -> None:
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule
    alone = [type(m).__name__ for m in layers if isinstance(m, FSDPModule) and not is_tract_layer(m)]
    if alone:
        raise TrActArgumentError(
            f'{name}: the first layer ({", ".join(alone)}) was sharded on its own by fully_shard, so it can no longer '
            f'become a TrAct layer. Call timm_tract.apply_tract(model) before fully_shard (then "{name}" or "{base}" '
            f'keeps it), or shard only the blocks and the root.')


def _is_muon(opt_class: Any) -> bool:
    from timm.optim import Muon
    return isinstance(opt_class, type) and issubclass(opt_class, Muon)


def _on_fallback(params: List[Any], weights: List[torch.Tensor]) -> List[Dict[str, Any]]:
    """`params` with `weights` moved to groups of their own with `use_fallback=True` (what timm's `fallback_list`
    builds), each a copy of its group's options (lr_scale, weight_decay, ...); groups already on the fallback stay."""
    ids = {id(w) for w in weights}
    groups = params if all(isinstance(g, dict) for g in params) else [{'params': params}]
    out = []
    for group in groups:
        members = _group_members(group)
        moved = [p for p in members if id(_as_tensor(p)) in ids]
        if not moved or group.get('use_fallback', False):
            out.append(group)
            continue
        kept = [p for p in members if id(_as_tensor(p)) not in ids]
        if kept:
            out.append({**group, 'params': kept})
        out.append({**group, 'params': moved, 'use_fallback': True})
    return out


def _create_tract_optimizer(
        params: Any,
        *,
        _base: str,
        tract_lambda: Optional[float] = None,
        tract_sync_gram: Optional[bool] = None,
        tract_lambda_mode: Optional[str] = None,
        **kwargs: Any,
) -> torch.optim.Optimizer:
    """`opt_class` of a `tract-<base>` registry entry: check, build `<base>(params, **kwargs)`, then TrAct on the
    model owning `params` (validate first, convert last: a failure leaves the model unchanged, also giving back the
    `requires_grad` of parameters timm's layer-decay schedule froze for these groups)."""
    frozen_by_schedule = _frozen_by_layer_decay(params)
    try:
        optimizer, model, layers = _build(params, _base, tract_lambda, tract_sync_gram, tract_lambda_mode, kwargs,
                                          frozen_by_schedule)
    except Exception:
        for p in frozen_by_schedule:
            p.requires_grad_(True)
        raise
    fallback = ' (weight in a use_fallback group: AdamW-style update, Newton-Schulz would discard the ' \
        'preconditioning)' if _is_muon(type(optimizer)) else ''
    _logger.info(
        f'{TRACT_OPT_PREFIX + _base}: TrAct on {type(model).__name__} first layer(s) '
        + ', '.join(f'{type(m).__name__}(tract_lambda={m.tract_lambda}, tract_lambda_mode={m.tract_lambda_mode}, '
                    f'sync_gram={m.sync_gram})' for m in layers)
        + fallback)
    return optimizer


def _build(
        params: Any, base: str, tract_lambda: Optional[float], sync_gram: Optional[bool], lambda_mode: Optional[str],
        kwargs: Dict[str, Any], frozen_by_schedule: List[torch.Tensor],
) -> Tuple[torch.optim.Optimizer, nn.Module, List[nn.Module]]:
    """(optimizer, model, its TrAct layers): every check, then `<base>(params, **kwargs)`, then TrAct on the model."""
    from timm.optim._optim_factory import default_registry
    name = TRACT_OPT_PREFIX + base
    if tract_lambda is not None:
        tract_lambda = check_lambda(tract_lambda)
    if lambda_mode is not None:
        lambda_mode = check_lambda_mode(lambda_mode)
    params = _materialize(params)
    tensors = list(_iter_group_params(params))
    try:
        model = find_model_of_params(tensors)
    except TrActArgumentError as e:
        raise TrActArgumentError(f'{name}: {e}') from None
    if model is None:
        raise TrActArgumentError(
            f'{name}: cannot find the model that owns the {len(tensors)} parameters given to the optimizer (they were '
            f'not registered on one nn.Module, e.g. a deepcopied or unpickled model, or parameters of several models). '
            f'Call timm_tract.apply_tract(model) and use the plain "{base}" optimizer instead.')
    layers = _target_layers(model)
    _check_trained(name, base, model, layers, tensors, frozen_by_schedule)
    _check_not_sharded_alone(name, base, layers)
    opt_class = default_registry.get_optimizer_class(base, bind_defaults=False)
    if _is_muon(opt_class):
        params = _on_fallback(params, [m.weight for m in layers])
    optimizer = opt_class(params, **kwargs)
    return optimizer, model, prepare_tract_model(model, tract_lambda, sync_gram, lambda_mode)


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
        _install_layer_decay_recorder()
    except (ImportError, AttributeError) as e:  # timm moved its registry: models keep working, tests fail loudly
        _logger.warning(f'timm-tract: could not register tract-* optimizers in timm\'s optimizer registry ({e!r}).')


_register_on_import()
