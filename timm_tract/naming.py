""" TrAct naming rules, in one place: twin model names and tags (timm's `split_model_name_tag`), the base
architecture of a twin, model names that point at weights (`hf-hub:`, `local-dir:`), the tag of a published repo,
the `tract-` optimizer prefix, and the paper id / citation.

Every other module asks these functions instead of looking at name suffixes itself. Whether a *built* model trains
with TrAct is a property of the model (`timm_tract.layers.is_tract_layer` on its modules), not of its name: a model
loaded from `hf-hub:` or `local-dir:` names no twin even when its weights were trained with TrAct.
"""
from typing import Dict, Optional, Tuple

__all__ = [
    'TRACT_SUFFIX', 'TRACT_OPT_PREFIX', 'TRACT_PAPER_ID', 'TRACT_PAPER_URL', 'TRACT_PAPER_TITLE', 'TRACT_BIBTEX',
    'HF_HUB_PREFIXES', 'LOCAL_MODEL_PREFIXES', 'split_model_name_tag', 'twin_name', 'twin_model_name', 'is_twin_name',
    'tract_base_arch', 'is_weights_source', 'hub_repo_id', 'repo_tag', 'is_tract_optimizer', 'base_optimizer_name',
]

TRACT_SUFFIX = '_tract'  # '<arch>_tract': the registered TrAct twin of timm's '<arch>'
TRACT_OPT_PREFIX = 'tract-'  # 'tract-<opt>': timm optimizer '<opt>' with a TrAct first layer (no '_', see optim.py)
HF_HUB_PREFIXES = ('hf-hub:', 'hf_hub:')  # timm: weights and config from a Hub repo
LOCAL_MODEL_PREFIXES = ('local-dir:', 'file:')  # timm: weights and config from a local folder / file
DEFAULT_REPO_TAG = 'tract'  # the tag of a published repo whose name has none ('me/resnet18' -> 'tract')
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


def split_model_name_tag(model_name: str, no_tag: str = '') -> Tuple[str, str]:
    """timm's rule: 'resnet50_tract.a1_in1k' -> ('resnet50_tract', 'a1_in1k'); 'resnet50' -> ('resnet50', '')."""
    from timm.models import split_model_name_tag as _timm_split
    return _timm_split(model_name, no_tag=no_tag)


def twin_model_name(model_name: str) -> str:
    """The twin of a model name, tag kept: 'resnet50.a1_in1k' -> 'resnet50_tract.a1_in1k'."""
    arch, tag = split_model_name_tag(model_name)
    return twin_name(arch) + (f'.{tag}' if tag else '')


def is_twin_name(model_name: str) -> bool:
    """Whether a model name is spelled as a twin ('<arch>_tract[.<tag>]'), registered or not."""
    return split_model_name_tag(model_name)[0].endswith(TRACT_SUFFIX)


def tract_base_arch(model_name: str) -> Optional[str]:
    """The timm architecture a registered twin mirrors ('resnet50_tract.a1_in1k' -> 'resnet50'); None otherwise."""
    return _TWIN_TO_BASE.get(split_model_name_tag(model_name)[0])


def is_weights_source(model_name: str) -> bool:
    """Whether a model name points at weights instead of naming an architecture: 'hf-hub:org/name',
    'local-dir:/path' (timm's prefixes)."""
    return str(model_name).startswith(HF_HUB_PREFIXES + LOCAL_MODEL_PREFIXES)


def hub_repo_id(model_name: str) -> Optional[str]:
    """The Hub repo of an 'hf-hub:org/name[@revision]' model name ('org/name'); None for other names."""
    name = str(model_name)
    if not name.startswith(HF_HUB_PREFIXES):
        return None
    return name.split(':', 1)[1].split('@')[0]


def repo_tag(repo_id: str) -> str:
    """The pretrained tag a published repo's name carries: 'me/resnet18_tract.tract_cifar10' -> 'tract_cifar10'
    ('tract' when the name has no tag)."""
    return split_model_name_tag(repo_id.split('/')[-1])[1] or DEFAULT_REPO_TAG


def is_tract_optimizer(opt_name: str) -> bool:
    """True for `tract-<opt>` names, also behind timm's prefixes ('lookahead_tract-adamw')."""
    return str(opt_name).lower().split('_')[-1].startswith(TRACT_OPT_PREFIX)


def base_optimizer_name(opt_name: str) -> str:
    """The optimizer a `tract-*` name trains everything else with ('lookahead_tract-adamw' -> 'lookahead_adamw')."""
    parts = str(opt_name).lower().split('_')
    if parts[-1].startswith(TRACT_OPT_PREFIX):
        parts[-1] = parts[-1][len(TRACT_OPT_PREFIX):]
    return '_'.join(parts)
