""" Manifest of TrAct weights this project has really published to the Hugging Face Hub.

`published.json` (next to this module) is a JSON list, empty until something is published; each entry is what
`timm-tract publish` prints after a successful upload:

    {"model": "resnet18_tract.tract_cifar10", "hf_hub_id": "org/resnet18_tract.tract_cifar10",
     "num_classes": 10, "input_size": [3, 32, 32], "mean": [...], "std": [...], "crop_pct": 0.95,
     "interpolation": "bicubic", "license": "apache-2.0"}

The `*_tract` registry turns `published_cfgs()['resnet18_tract']` into extra pretrained tags
(`resnet18_tract.tract_cifar10`), so `timm.create_model('resnet18_tract.tract_cifar10', pretrained=True)` loads them.
Nothing here touches the network.
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .errors import TrActArgumentError
from .naming import is_twin_name, split_model_name_tag

__all__ = ['MANIFEST_PATH', 'load_manifest', 'published_cfgs']

MANIFEST_PATH = Path(__file__).resolve().parent / 'published.json'

_logger = logging.getLogger(__name__)

_REQUIRED = ('model', 'hf_hub_id', 'num_classes')
_CFG_KEYS = ('num_classes', 'input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation', 'license',
             'label_names', 'notes', 'paper_ids', 'origin_url')


def _check_entry(entry: Any, i: int, path: Path) -> None:
    if not isinstance(entry, dict):
        raise TrActArgumentError(f'{path}: entry {i} is not an object; copy the entry `timm-tract publish` printed')
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise TrActArgumentError(f'{path}: entry {i} lacks {missing}; copy the entry `timm-tract publish` printed')
    if not is_twin_name(str(entry['model'])) or not split_model_name_tag(str(entry['model']))[1]:
        raise TrActArgumentError(f"{path}: entry {i} model {entry['model']!r} must be '<arch>_tract.<tag>'")
    if not isinstance(entry['hf_hub_id'], str) or entry['hf_hub_id'].count('/') != 1:
        raise TrActArgumentError(f"{path}: entry {i} hf_hub_id {entry['hf_hub_id']!r} must be 'org/name'")
    if isinstance(entry['num_classes'], bool) or not isinstance(entry['num_classes'], int) or entry['num_classes'] < 1:
        raise TrActArgumentError(f"{path}: entry {i} num_classes {entry['num_classes']!r} must be a positive integer")


def load_manifest(path: Optional[Union[str, Path]] = None, strict: bool = True) -> List[Dict[str, Any]]:
    """Entries of the manifest, checked: each names `<arch>_tract.<tag>`, a Hub repo `org/name` and `num_classes`.

    `strict=False` (what `import timm_tract` uses) warns and skips a bad entry, or the whole file when it is not a
    JSON list, instead of raising (TrActArgumentError, a ValueError)."""
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list):
            raise TrActArgumentError(f'{path}: the published-weights manifest must be a JSON list of entries')
    except (ValueError, UnicodeDecodeError) as e:
        if strict:
            raise TrActArgumentError(f'{path} is not a valid published-weights manifest ({e})') from None
        _logger.warning(f'timm-tract: ignoring {path} ({e}); no published TrAct tags are registered')
        return []
    good = []
    for i, entry in enumerate(entries):
        try:
            _check_entry(entry, i, path)
        except TrActArgumentError as e:
            if strict:
                raise
            _logger.warning(f'timm-tract: skipping a published-weights entry: {e}')
            continue
        good.append(entry)
    return good


def published_cfgs(path: Optional[Union[str, Path]] = None) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{'<arch>_tract': {'<tag>': pretrained-cfg fields}} for every valid published entry (hf_hub_id, num_classes, data
    cfg); bad entries are skipped with a warning, so a damaged manifest never breaks `import timm_tract`."""
    cfgs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for entry in load_manifest(path, strict=False):
        arch, _, tag = entry['model'].partition('.')
        cfg = {k: (tuple(v) if isinstance(v, list) and k != 'label_names' else v)
               for k, v in entry.items() if k in _CFG_KEYS}
        cfg['hf_hub_id'] = entry['hf_hub_id']
        cfgs.setdefault(arch, {})[tag] = cfg
    return cfgs
