""" TrAct naming rules, in one place: twin model names, the base architecture of a twin, the `tract-` optimizer
prefix, and the paper id / citation.

Every other module asks these functions instead of looking at name suffixes itself. Whether a *built* model trains
with TrAct is a property of the model (`timm_tract.layers.is_tract_layer` on its modules), not of its name: a model
loaded from `hf-hub:` or `local-dir:` names no twin even when its weights were trained with TrAct.
"""
from typing import Dict, Optional

__all__ = [
    'TRACT_SUFFIX', 'TRACT_OPT_PREFIX', 'TRACT_PAPER_ID', 'TRACT_PAPER_URL', 'TRACT_PAPER_TITLE', 'TRACT_BIBTEX',
    'twin_name', 'tract_base_arch', 'is_tract_optimizer', 'base_optimizer_name',
]

TRACT_SUFFIX = '_tract'  # '<arch>_tract': the registered TrAct twin of timm's '<arch>'
TRACT_OPT_PREFIX = 'tract-'  # 'tract-<opt>': timm optimizer '<opt>' with a TrAct first layer (no '_', see optim.py)
TRACT_PAPER_ID = 'arXiv:2410.23970'
TRACT_PAPER_URL = 'https://arxiv.org/abs/2410.23970'
TRACT_PAPER_TITLE = 'TrAct: Making First-layer Pre-Activations Trainable (Petersen, Borgelt, Ermon, NeurIPS 2024)'
TRACT_BIBTEX = """@inproceedings{petersen2024tract,
  title={TrAct: Making First-layer Pre-Activations Trainable},
  author={Petersen, Felix and Borgelt, Christian and Ermon, Stefano},
  booktitle={Conference on Neural Information Processing Systems (NeurIPS)},
  year={2024}
}"""

_TWIN_TO_BASE: Dict[str, str] = {}  # '<arch>_tract' -> '<arch>', filled by the registry (timm_tract.models)


def twin_name(arch: str) -> str:
    """'resnet50' -> 'resnet50_tract' (the name only; `tract_base_arch` says whether it is registered)."""
    return arch + TRACT_SUFFIX


def _register_twin(twin: str, base: str) -> None:
    _TWIN_TO_BASE[twin] = base


def _split_tag(model_name: str):
    from timm.models import split_model_name_tag
    return split_model_name_tag(model_name)


def tract_base_arch(model_name: str) -> Optional[str]:
    """The timm architecture a registered twin mirrors ('resnet50_tract.a1_in1k' -> 'resnet50'); None otherwise."""
    return _TWIN_TO_BASE.get(_split_tag(model_name)[0])


def is_tract_optimizer(opt_name: str) -> bool:
    """True for `tract-<opt>` names, also behind timm's prefixes ('lookahead_tract-adamw')."""
    return str(opt_name).lower().split('_')[-1].startswith(TRACT_OPT_PREFIX)


def base_optimizer_name(opt_name: str) -> str:
    """The optimizer a `tract-*` name trains everything else with ('lookahead_tract-adamw' -> 'lookahead_adamw')."""
    parts = str(opt_name).lower().split('_')
    if parts[-1].startswith(TRACT_OPT_PREFIX):
        parts[-1] = parts[-1][len(TRACT_OPT_PREFIX):]
    return '_'.join(parts)
