""" Model cards for TrAct runs: computed model stats, the training command, and the README.md rendered with Jinja2
from the templates in `model_cards/` (front matter through huggingface_hub's `ModelCardData`).
"""
import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['CardInputs', 'model_stats', 'training_command', 'render_model_card', 'TEMPLATE_DIR']

# installed wheel: packaged as timm_tract/model_cards; source checkout / editable install: model_cards/ at the top
_PACKAGED_TEMPLATES = Path(__file__).resolve().parent / 'model_cards'
TEMPLATE_DIR = _PACKAGED_TEMPLATES if _PACKAGED_TEMPLATES.is_dir() else Path(__file__).resolve().parent.parent / 'model_cards'

TRACT_PAPER = 'arXiv:2410.23970'
_TRACT_BIBTEX = """@inproceedings{petersen2024tract,
  title={TrAct: Making First-layer Pre-Activations Trainable},
  author={Petersen, Felix and Borgelt, Christian and Ermon, Stefano},
  booktitle={Conference on Neural Information Processing Systems (NeurIPS)},
  year={2024}
}"""
_TIMM_BIBTEX = """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""

# argparse destinations that locate a run on one machine rather than describe the recipe
_NON_RECIPE_ARGS = frozenset({
    'output', 'experiment', 'resume', 'config', 'data', 'log_wandb', 'wandb_project', 'wandb_tags',
    'wandb_resume_id', 'rank', 'world_size', 'local_rank', 'distributed', 'device_id', 'result',
})


@dataclasses.dataclass
class CardInputs:
    """Everything a model card states; accuracies in percent (as timm's summary.csv), image size (H, W) in pixels."""
    repo_id: str
    base_arch: str
    tract_arch: str
    num_classes: int
    img_size: Tuple[int, int]
    stats: Dict[str, float]
    tract_lambda: float
    tract_layer: str
    train_command: str
    license: str = 'apache-2.0'
    label_names: Optional[List[str]] = None
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset_name: str = 'unknown'
    dataset_id: Optional[str] = None
    dataset_split: str = 'validation'
    base_model: Optional[str] = None
    checkpoint: str = 'best'
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    ema: bool = False
    top1: Optional[float] = None
    top5: Optional[float] = None
    results: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    comparison: Optional[Dict[str, Any]] = None
    plot_file: Optional[str] = None
    features_only: bool = True
    num_features: int = 0


def model_stats(model: nn.Module, input_size: Sequence[int]) -> Dict[str, float]:
    """Params (M), GMACs and activations (M) for one image of `input_size` (C, H, W); 2 decimals (3 significant
    digits below 1).

    MACs = FLOPs / 2 from `torch.utils.flop_counter.FlopCounterMode`; activations = output elements of every
    Conv and Linear layer (what fvcore counts for CNNs; attention matmuls are not included). Runs a copy of the
    model on the meta device, so it costs no memory or time for the weights.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    meta = _meta_copy(model).eval()
    acts = [0]

    def _count(_m, _i, out):
        acts[0] += out.numel()

    hooks = [m.register_forward_hook(_count) for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta(torch.empty(1, *input_size, device='meta'))
    finally:
        for h in hooks:
            h.remove()
    return {
        'params_m': _round_stat(params / 1e6),
        'gmacs': _round_stat(counter.get_total_flops() / 2e9),
        'activations_m': _round_stat(acts[0] / 1e6),
    }


def _round_stat(value: float) -> float:
    """2 decimals as timm's cards, 3 significant digits below 1 so small models do not read 0.0."""
    return round(value, 2) if value >= 1 else float(f'{value:.3g}')


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).to_empty(device='meta')


def training_command(args: Mapping[str, Any], parser: Optional[argparse.ArgumentParser] = None) -> str:
    """The command line that reproduces a run from its `args.yaml`.

    `timm-tract train` when the run has `tract_lambda` (our trainer), else timm's `python train.py`. Flags come from
    `parser` (default: `timm-tract train`'s, whose names are train.py's): values equal to the parser default are left
    out, so the command parses back to the same args. Keys the parser does not know (train.py-only flags) are
    spelled `--key-name` when set. Booleans become bare flags, lists space-separated values, dicts `k=v` pairs.
    """
    ours = 'tract_lambda' in args
    if parser is None:
        parser = _train_parser()
    actions = {a.dest: a for a in getattr(parser, '_actions', ()) if a.option_strings}
    program = ['timm-tract', 'train'] if ours else ['python', 'train.py']
    parts: List[str] = []
    first = ('model', 'data_dir', 'dataset')
    ordered = [(k, args[k]) for k in first if k in args] + [(k, v) for k, v in args.items() if k not in first]
    for key, value in ordered:
        if key in _NON_RECIPE_ARGS:
            continue
        action = actions.get(key)
        if action is None:
            if ours and actions:
                continue  # bookkeeping our trainer stores, not a flag
            if value is None or value is False or value in ('', [], {}):
                continue
            flag = '--' + key.replace('_', '-')
        else:
            if _same(value, action.default):
                continue
            flag = max((o for o in action.option_strings if o.startswith('--')), key=len, default=action.option_strings[0])
            if action.nargs == 0:  # store_true / store_false / store_const
                if value == action.const:
                    parts.append(flag)
                continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, dict):
            parts.append(' '.join([flag] + [shlex.quote(f'{k}={v}') for k, v in value.items()]))
        elif isinstance(value, (list, tuple)):
            parts.append(' '.join([flag] + [shlex.quote(str(v)) for v in value]))
        else:
            parts.append(f'{flag} {shlex.quote(str(value))}')
    return ' \\\n  '.join([' '.join(program)] + parts)


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default and type(value) is type(default) or (value is None and default is None)


def _train_parser() -> Optional[argparse.ArgumentParser]:
    try:
        from .train import build_train_parser
    except ImportError:
        return None
    return build_train_parser()


def _front_matter(info: CardInputs) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    dataset_type = info.dataset_id or info.dataset_name
    eval_results = []
    for metric, name, value in (('accuracy', 'Top-1 Accuracy', info.top1), ('top_5_accuracy', 'Top-5 Accuracy', info.top5)):
        if value is not None:
            eval_results.append(EvalResult(
                task_type='image-classification', dataset_type=dataset_type, dataset_name=info.dataset_name,
                dataset_split=info.dataset_split, metric_type=metric, metric_name=name, metric_value=round(value, 3)))
    data = ModelCardData(
        library_name='timm',
        license=info.license,
        tags=['image-classification', 'timm', 'tract'],
        pipeline_tag='image-classification',
        datasets=[info.dataset_id] if info.dataset_id else None,
        base_model=info.base_model,
        model_name=info.repo_id.split('/')[-1],
        eval_results=eval_results or None,
    )
    return data.to_yaml()


def _environment(template_dir: Path):
    try:
        import jinja2
    except ImportError as e:  # jinja2 is a declared dependency; say so if an environment lost it
        raise ImportError('timm_tract.cards needs Jinja2: pip install jinja2') from e
    if not (template_dir / 'modelcard.md.j2').is_file():
        raise FileNotFoundError(
            f'model card templates not found in {template_dir}; pass template_dir= pointing at the '
            f"project's model_cards/ folder")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)


def render_model_card(info: CardInputs, template_dir: Optional[Path] = None) -> str:
    """README.md text (YAML front matter + Markdown body) for a published TrAct run."""
    env = _environment(Path(template_dir) if template_dir else TEMPLATE_DIR)
    h, w = info.img_size
    context = dict(
        dataclasses.asdict(info),
        card_data=_front_matter(info),
        model_name=info.repo_id.split('/')[-1],
        image_size=f'{h} x {w}',
        input_h=h,
        input_w=w,
        tract_paper=TRACT_PAPER,
        citations=[_TRACT_BIBTEX, _TIMM_BIBTEX],
        overlay_kwargs=_overlay_kwargs(info),
        top_k=min(5, info.num_classes),
    )
    context['snippets'] = {
        name: env.get_template(f'snippets/{name}.py.j2').render(**context).strip()
        for name in ('classification', 'features', 'embeddings', 'continue_training')
        if name != 'features' or info.features_only
    }
    return env.get_template('modelcard.md.j2').render(**context)


def _overlay_kwargs(info: CardInputs) -> str:
    """Keyword arguments that rebuild the published model under its `*_tract` name (head size, model args)."""
    kwargs = {'num_classes': info.num_classes}
    kwargs.update({k: v for k, v in info.model_args.items() if k not in ('num_classes',)})
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
