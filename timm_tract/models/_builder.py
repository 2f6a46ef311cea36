""" Registering and building `<arch>_tract` twins of timm architectures.

A twin is timm's architecture with its first layer (timm's `first_conv`) made a TrAct layer by `apply_tract`.

Registration (at import, cheap: no model is instantiated, nothing is downloaded): for every architecture of a timm
model module (`timm.list_models(module=family)`), one entrypoint `<arch>_tract` and its default cfgs, made with
`generate_default_cfgs` from the base architecture's pretrained cfgs (same tags, same weight locations, so
`<arch>_tract.<tag>` loads the base weights lazily), plus `tract_lambda` and the TrAct paper id.

Building: the twin entrypoint runs timm's own entrypoint for the base architecture and timm's family builder
(`_create_resnet`, `_create_vision_transformer`, ...), so every architecture argument, checkpoint filter and feature
config comes from timm unchanged. Only the final `build_model_with_cfg` call is redirected (in a private copy of the
function globals, timm itself is never modified) to `build_model_with_cfg(<TrAct constructor>, '<arch>_tract', ...)`:
the model is built under the twin's name and cfg, its first layer becomes TrAct right after construction, i.e.
before pretrained weights are loaded and before a `features_only` wrapper is put around it.
"""
import dataclasses
import sys
import types
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import (
    PretrainedCfg, build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, list_models,
    model_entrypoint, register_model, resolve_pretrained_cfg, split_model_name_tag)

from ..functional import DEFAULT_LAMBDA, DEFAULT_LAMBDA_MODE, check_lambda, check_lambda_mode
from ..layers import apply_tract, is_tract_layer
from ..naming import TRACT_PAPER_ID, _register_twin, tract_base_arch, twin_name
from ..published import published_cfgs

__all__ = ['TrActPretrainedCfg', 'TRACT_PAPER_ID', 'register_tract_family', 'tract_base_arch']



@dataclass
class TrActPretrainedCfg(PretrainedCfg):
    """timm's PretrainedCfg plus the TrAct λ and λ mode the twin is built with (the `tract_lambda` /
    `tract_lambda_mode` create_model kwargs win)."""
    tract_lambda: float = DEFAULT_LAMBDA
    tract_lambda_mode: str = DEFAULT_LAMBDA_MODE


# ----------------------------------------------------------------------------------------------------------------
# Default cfgs

def _as_tuple(value: Union[None, str, Tuple[str, ...]]) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _to_tract_cfg(cfg: PretrainedCfg, **changes: Any) -> TrActPretrainedCfg:
    """Shallow field copy of a PretrainedCfg into a TrActPretrainedCfg (keeps `tract_lambda` if it has one)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    values.update(changes)
    return TrActPretrainedCfg(**values)


def _twin_cfg(base_name: str, base_cfg: PretrainedCfg) -> TrActPretrainedCfg:
    """The twin's cfg for the base cfg `<arch>.<tag>`: same weights, data and head config, TrAct metadata added."""
    notes = [
        f'TrAct first layer ({base_cfg.first_conv}, {TRACT_PAPER_ID}): only its weight gradient differs from timm '
        f'`{split_model_name_tag(base_name)[0]}`; forward, state dict and inference are identical.',
    ]
    if base_cfg.has_weights:
        description = (
            f'TrAct twin of timm `{base_name}`. Pretrained weights are timm\'s `{base_name}` weights, '
            f'trained WITHOUT TrAct: a start point for TrAct fine-tuning, not a TrAct-trained model.')
        notes.append(f'Weights: timm `{base_name}`, trained without TrAct (TrAct changes training only).')
    else:
        description = f'TrAct twin of timm `{base_name}` (no pretrained weights for this tag).'
    return _to_tract_cfg(
        base_cfg,
        architecture=None,
        tag=None,
        description=description,
        paper_ids=(TRACT_PAPER_ID,) + tuple(p for p in _as_tuple(base_cfg.paper_ids) if p != TRACT_PAPER_ID),
        notes=tuple(notes) + _as_tuple(base_cfg.notes),
        tract_lambda=DEFAULT_LAMBDA,
    )


def _published_cfg(twin: str, tag: str, fields: Dict[str, Any], base_cfg: PretrainedCfg) -> TrActPretrainedCfg:
    """Cfg of weights timm-tract published (trained WITH TrAct): the base's family cfg with the manifest's fields."""
    return _to_tract_cfg(
        base_cfg,
        url='', file=None, state_dict=None, hf_hub_filename=None, source=None, custom_load=False,
        architecture=None, tag=None, tract_lambda=DEFAULT_LAMBDA,
        description=f'`{twin}.{tag}`: trained WITH TrAct ({TRACT_PAPER_ID}) and published by timm-tract.',
        paper_ids=(TRACT_PAPER_ID,), notes=(), **fields)


def _twin_cfgs(arch: str, published: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, TrActPretrainedCfg]:
    """{'<arch>_tract.<tag>': cfg} for every tag of `arch`, the base's default tag marked default ('*'), plus the
    tags of `published` ({tag: cfg fields} from timm_tract's published-weights manifest)."""
    twin = twin_name(arch)
    out = {}
    for i, (base_name, base_cfg) in enumerate(get_arch_pretrained_cfgs(arch).items()):
        tag = split_model_name_tag(base_name)[1]
        key = f'{twin}.{tag}' if tag else twin
        if i == 0 and tag:
            key += '*'
        out[key] = _twin_cfg(base_name, base_cfg)
    if not out:  # a base without any cfg: a weight-less twin cfg with timm's defaults
        out[twin] = _to_tract_cfg(PretrainedCfg(), paper_ids=(TRACT_PAPER_ID,))
    family_cfg = next(iter(out.values()))
    for tag, fields in (published or {}).items():
        out[f'{twin}.{tag}'] = _published_cfg(twin, tag, fields, family_cfg)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Registration

def _make_entrypoint(twin: str, base: str, module_name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create_tract(twin, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = twin
    entrypoint.__module__ = module_name
    entrypoint.__doc__ = (
        f'timm `{base}` with a TrAct first layer ({TRACT_PAPER_ID}). Accepts every `{base}` kwarg plus '
        f'`tract_lambda` (λ > 0, default 0.1) and `tract_lambda_mode` (\'absolute\' default, or \'relative\').')
    return entrypoint


def register_tract_family(module_name: str, family: str, exclude: Tuple[str, ...] = ()) -> List[str]:
    """Register `<arch>_tract` for every architecture of timm model module `family`, from module `module_name`.

    The twins' timm module key is the last component of `module_name` (so it must not be a timm module name).
    Sets `default_cfgs` and one attribute per entrypoint on that module. Returns the twin names.
    """
    module = sys.modules[module_name]
    archs = [a for a in list_models(module=family) if a not in exclude and tract_base_arch(a) is None]
    published = published_cfgs()
    cfgs: Dict[str, TrActPretrainedCfg] = {}
    for arch in archs:
        cfgs.update(_twin_cfgs(arch, published.get(twin_name(arch))))
    module.default_cfgs = generate_default_cfgs(cfgs)  # register_model reads these by entrypoint name
    twins = []
    for arch in archs:
        twin = twin_name(arch)
        _register_twin(twin, arch)
        fn = register_model(_make_entrypoint(twin, arch, module_name))
        setattr(module, twin, fn)
        twins.append(twin)
    return twins


# ----------------------------------------------------------------------------------------------------------------
# Building

class _TrActPatchEmbed(PatchEmbed):
    """timm PatchEmbed whose `set_input_size(patch_size=...)` keeps a TrAct `proj` TrAct (timm's rebuilds it plain)."""

    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ):
        proj = self.proj
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        if self.proj is not proj and is_tract_layer(proj):
            apply_tract(self, proj.tract_lambda, layer='proj', sync_gram=proj.sync_gram,
                        tract_lambda_mode=proj.tract_lambda_mode)


def _guard_stem_rebuilds(model: nn.Module) -> None:
    """Give every PatchEmbed holding a TrAct `proj` the TrAct-preserving `set_input_size`."""
    for module in model.modules():
        if type(module) is PatchEmbed and is_tract_layer(module.proj):
            module.__class__ = _TrActPatchEmbed


def _construct_twin(
        model_cls: Callable[..., nn.Module],
        first_conv: Union[None, str, Tuple[str, ...]],
        tract_lambda: float,
        tract_lambda_mode: str,
        pruned_variant: Optional[str],
        **kwargs,
) -> nn.Module:
    """Instantiate the base class, apply timm's pruning spec (if any), then make the first layer TrAct."""
    model = model_cls(**kwargs)
    if pruned_variant:
        from timm.models._prune import adapt_model_from_file  # rebuilds convs: before TrAct, never after
        model = adapt_model_from_file(model, pruned_variant)
    apply_tract(model, tract_lambda, layer=first_conv or None, tract_lambda_mode=tract_lambda_mode)
    _guard_stem_rebuilds(model)
    return model


def _resolve_twin_cfg(
        twin: str,
        pretrained_cfg: Union[None, str, Dict[str, Any], PretrainedCfg],
        pretrained_cfg_overlay: Optional[Dict[str, Any]],
        tract_lambda: Optional[float],
        tract_lambda_mode: Optional[str] = None,
) -> TrActPretrainedCfg:
    """timm's cfg resolution under the twin's name; a dict or plain PretrainedCfg may carry `tract_lambda` and
    `tract_lambda_mode`."""
    if isinstance(pretrained_cfg, dict):
        pretrained_cfg = TrActPretrainedCfg(**pretrained_cfg)
    elif isinstance(pretrained_cfg, PretrainedCfg) and not isinstance(pretrained_cfg, TrActPretrainedCfg):
        pretrained_cfg = _to_tract_cfg(pretrained_cfg)
    cfg = resolve_pretrained_cfg(twin, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if not isinstance(cfg, TrActPretrainedCfg):  # an arch without registered cfg gets timm's default PretrainedCfg
        cfg = _to_tract_cfg(cfg)
    if tract_lambda is not None:
        cfg = dataclasses.replace(cfg, tract_lambda=tract_lambda)
    if tract_lambda_mode is not None:
        cfg = dataclasses.replace(cfg, tract_lambda_mode=tract_lambda_mode)
    check_lambda(cfg.tract_lambda)
    check_lambda_mode(cfg.tract_lambda_mode)
    return cfg


def _build_twin(
        twin: str,
        base: str,
        tract_lambda: Optional[float],
        tract_lambda_mode: Optional[str],
        built: List[str],
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        **kwargs,
) -> nn.Module:
    """Stands in for `build_model_with_cfg` inside timm's family builder while building twin `twin`."""
    if variant != base or built:  # not the base build (a nested build of another model): leave it alone
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    built.append(variant)
    cfg = _resolve_twin_cfg(twin, kwargs.pop('pretrained_cfg', None), kwargs.pop('pretrained_cfg_overlay', None),
                            tract_lambda, tract_lambda_mode)
    constructor = partial(
        _construct_twin, model_cls, cfg.first_conv, cfg.tract_lambda, cfg.tract_lambda_mode,
        base if kwargs.pop('pruned', False) else None)
    return build_model_with_cfg(constructor, twin, pretrained, pretrained_cfg=cfg, **kwargs)


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _copy_function(fn: types.FunctionType, namespace: Dict[str, Any]) -> types.FunctionType:
    out = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__qualname__, out.__module__, out.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return out


def _with_build_redirect(entrypoint: types.FunctionType, build_fn: Callable[..., nn.Module]) -> types.FunctionType:
    """A copy of `entrypoint`, and of the module functions it reaches, whose `build_model_with_cfg` is `build_fn`.

    Works on a private copy of the module globals: timm's module and functions stay untouched (thread safe).
    """
    module_globals = entrypoint.__globals__
    namespace = dict(module_globals)
    namespace['build_model_with_cfg'] = build_fn
    reached: Dict[str, types.FunctionType] = {}
    todo = [entrypoint]
    while todo:
        for name in _code_names(todo.pop().__code__):
            obj = module_globals.get(name)
            if (isinstance(obj, types.FunctionType) and obj.__globals__ is module_globals
                    and name not in reached and obj is not entrypoint):
                reached[name] = obj
                todo.append(obj)
    for name, fn in reached.items():
        namespace[name] = _copy_function(fn, namespace)
    return _copy_function(entrypoint, namespace)


def _create_tract(twin: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build twin `twin` ('<arch>_tract') through timm's entrypoint and family builder for `<arch>`."""
    base = tract_base_arch(twin)
    tract_lambda = kwargs.pop('tract_lambda', None)
    if tract_lambda is not None:
        check_lambda(tract_lambda)
    tract_lambda_mode = kwargs.pop('tract_lambda_mode', None)
    if tract_lambda_mode is not None:
        check_lambda_mode(tract_lambda_mode)
    if kwargs.get('use_naflex'):
        raise ValueError(
            f'{twin}: use_naflex=True is not supported. NaFlexVit embeds padded, pre-patchified inputs with a Linear '
            f'layer, so the TrAct statistics would count padding patches; build the classic ViT (use_naflex=False, '
            f'and leave TIMM_USE_NAFLEXVIT unset).')
    entrypoint = model_entrypoint(base)
    if not isinstance(entrypoint, types.FunctionType):
        raise RuntimeError(f'{twin}: timm\'s entrypoint for `{base}` is {entrypoint!r}, not a plain function; '
                           f'build `{base}` and call timm_tract.apply_tract(model) instead.')
    built: List[str] = []
    build = partial(_build_twin, twin, base, tract_lambda, tract_lambda_mode, built)
    redirected = _with_build_redirect(entrypoint, build)
    model = redirected(pretrained=pretrained, **kwargs)
    if not built:
        raise RuntimeError(
            f'{twin}: timm built `{base}` without calling `build_model_with_cfg` in its own module (e.g. '
            f'TIMM_USE_NAFLEXVIT=true switches ViTs to NaFlexVit), so no TrAct layer could be installed. '
            f'Unset that option, or build `{base}` and call timm_tract.apply_tract(model).')
    return model
