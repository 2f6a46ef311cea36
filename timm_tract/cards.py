""" Model cards for TrAct runs: what a card states and how it is rendered.

Card content is computed here from a run's numbers (model stats, per-epoch results, the `timm-tract compare` table),
never pasted from files: a compare report's values are type-checked, its sentences and its plot re-rendered from
them. What reaches a published file is public: local paths in the training command and hyper-parameters become
placeholders at every depth (`--data-dir <DATA_DIR>`, `pretrained_cfg_overlay={'file': '<PATH>'}`), names taken from
files are used only when they are plain names, and the data set is named by its real name (a known data set's Hub
id, the name recorded at training time in the run's data_facts.json, else the folder name). Nothing here reads a
file. Metrics that are not finite are left out. Epochs are counted from 1 everywhere a person reads them.
The README.md is rendered with Jinja2 from the templates in `model_cards/` (front matter through huggingface_hub's
`ModelCardData`).
"""
import argparse
import dataclasses
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .compare.stats import METHODS, speedup, table_rows
from .data import known_dataset
from .naming import (LOCAL_MODEL_PREFIXES, TRACT_BIBTEX, TRACT_PAPER_ID, hub_repo_id, split_model_name_tag,
                     tract_base_arch, twin_name)
from .rundir import DataFacts, RunInfo, history_row

__all__ = ['CardInputs', 'CardModel', 'card_inputs', 'model_card', 'model_stats', 'training_command',
           'render_model_card', 'public_args', 'public_name', 'dataset_names', 'eval_split', 'results_rows',
           'comparison_section', 'comparison_plot', 'eval_results', 'TEMPLATE_DIR']

# installed wheel: packaged as timm_tract/model_cards; source checkout / editable install: model_cards/ at the top
_PACKAGED_TEMPLATES = Path(__file__).resolve().parent / 'model_cards'
TEMPLATE_DIR = (_PACKAGED_TEMPLATES if _PACKAGED_TEMPLATES.is_dir()
                else Path(__file__).resolve().parent.parent / 'model_cards')

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
# path-valued arguments, written as placeholders in anything published
_PATH_PLACEHOLDERS = {
    'data_dir': '<DATA_DIR>', 'data': '<DATA_DIR>', 'class_map': '<CLASS_MAP>', 'initial_checkpoint': '<CHECKPOINT>',
    'resume': '<CHECKPOINT>', 'output': '<OUTPUT_DIR>', 'pretrained_path': '<CHECKPOINT>', 'config': '<CONFIG>',
}

_SAFE_TEXT = re.compile(r'^[\w.+\-/ ()]{1,100}$')  # labels and names taken from files: plain words only
# a local path inside a longer value ("file=/home/u/x", "(~/data, ./w.pth)"): at the start or after a separator
_EMBEDDED_PATH = re.compile(r"""(?:^|(?<=[\s=:,;'"(\[{]))(?:~|\.{1,2})?/(?!/)[^\s'",;)\]}]*""")


def _is_local_path(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith(('~', './', '../', '.\\', '..\\'))
            or bool(re.match(r'^[A-Za-z]:[\\/]', text)))


def _public_text(text: str) -> str:
    """A string fit for publishing: a local path (also a `local-dir:`/`file:` model name, or a path inside a longer
    value such as `file=/home/u/w.pth`) becomes a placeholder."""
    if text.startswith(LOCAL_MODEL_PREFIXES):
        return text.split(':', 1)[0] + ':<MODEL_DIR>'
    if _is_local_path(text):
        return '<PATH>'
    return _EMBEDDED_PATH.sub('<PATH>', text)


def _public_value(key: str, value: Any) -> Any:
    """A recipe value fit for publishing, at every depth (dicts and lists such as `--model-kwargs
    pretrained_cfg_overlay={'file': ...}`): path-valued arguments and local paths become placeholders."""
    if isinstance(value, Mapping):
        return {k: _public_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_public_value(key, v) for v in value)
    if not isinstance(value, str) or not value:
        return value
    if key in _PATH_PLACEHOLDERS:
        return _PATH_PLACEHOLDERS[key]
    return _public_text(value)


def public_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The run's args with every local path, at every depth, replaced by a placeholder (`data_dir: <DATA_DIR>`): what
    is published as `train_hparams.yaml`."""
    return {k: _public_value(k, v) for k, v in args.items()}


def public_name(value: Any) -> Optional[str]:
    """`value` when it is a short plain name fit for a published text or picture (words, '.', '-', '/', no local
    path); None otherwise."""
    if not isinstance(value, str) or not _SAFE_TEXT.match(value) or _public_text(value) != value:
        return None
    return value


def dataset_names(args: Mapping[str, Any], name: Optional[str] = None, dataset_id: Optional[str] = None,
                  facts: Optional[DataFacts] = None) -> Tuple[str, Optional[str]]:
    """(display name, Hub data set id) of the run's data: `name`/`dataset_id` when given, else a known timm data set,
    `hfds/<id>`, the data set recorded at training time in the run's `data_facts.json` (a data set `timm-tract data`
    prepared: its real name; a development split says so), else the data folder's name. Reads no file."""
    ds = str(args.get('dataset') or '')
    known = known_dataset(ds) if ds else None
    known_name, known_id = (known.display_name, known.hub_id) if known else (None, None)
    if ds.startswith(('hfds/', 'hfids/')):
        known_name = known_id = public_name(ds.split('/', 1)[1])
    if facts is not None:
        known_name = known_name or public_name(facts.name)
        known_id = known_id or public_name(facts.hub_id)
        if facts.subset and known_name:
            known_name += ' (a development split of its training set)'
    data_dir = args.get('data_dir')
    if known_name is None and isinstance(data_dir, str) and data_dir:
        known_name = public_name(Path(data_dir).name)
    return name or known_name or public_name(ds) or 'unknown', dataset_id or known_id


def eval_split(args: Mapping[str, Any], facts: Optional[DataFacts] = None) -> str:
    """The split the run's validation metrics are from: torch/* data sets evaluate on the official test split
    (timm reads any non-train split of them as `train=False`); a development split holds out part of train."""
    split = str(args.get('val_split') or 'validation')
    if facts is not None and facts.subset:
        return 'train (held-out part)'
    if str(args.get('dataset') or '').startswith('torch/') and split not in ('train', 'training'):
        return 'test'
    return public_name(split) or 'validation'


def _finite(value: Any) -> Optional[float]:
    """A metric fit for publishing: a finite number, else None (NaN is never published)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _format_number(value: Optional[float]) -> str:
    if value is None:
        return ''
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e6 else f'{value:.4g}'


def results_rows(history: Sequence[Mapping[str, Optional[float]]], limit: int = 20) -> List[Dict[str, str]]:
    """Per-epoch rows for the card (at most `limit`, evenly spaced, the last always kept); epochs counted from 1."""
    keys = ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
    rows = [{'epoch': str(int(r['epoch']) + 1), **{k: _format_number(r.get(k)) for k in keys}} for r in history]
    if len(rows) > limit:
        step = len(rows) / (limit - 1)
        rows = [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]]
    return rows


def _method_labels(report: Mapping[str, Any]) -> Dict[str, str]:
    return {'baseline': public_name(report.get('baseline_label')) or 'baseline',
            'tract': public_name(report.get('tract_label')) or 'TrAct'}


def comparison_section(report: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """Card section from a `timm-tract compare` report: the top-1 table (mean ± std over seeds) and the speed-up,
    both rendered here from the report's type-checked numbers; entries of the wrong type are left out."""
    rows = table_rows(report or {})
    if not rows:
        return None
    try:
        summary = speedup([dataclasses.asdict(r) for r in rows])['text']
    except (ValueError, KeyError):
        summary = 'No speed-up was measured.'
    seeds = [s for s in (report.get('seeds') or []) if isinstance(s, int) and not isinstance(s, bool)]
    if seeds:
        summary += (f" Baseline and TrAct were trained with the same recipe and data order, seeds "
                    f"{', '.join(map(str, seeds))}.")
    labels = _method_labels(report)
    return {'summary': summary, 'columns': ['method', 'epochs', 'seeds', 'top-1 (%)'],
            'rows': [[labels[r.method], str(r.epochs), str(r.n), f"{r.mean:.2f} ± {r.std:.2f}"] for r in rows]}


@dataclasses.dataclass
class CardInputs:
    """Everything a model card states; accuracies in percent (as timm's summary.csv), image size (H, W) in pixels,
    `epoch` the checkpoint's epoch as timm stores it (from 0; the card shows it from 1)."""
    repo_id: str
    base_arch: str
    tract_arch: str
    num_classes: int
    img_size: Tuple[int, int]
    stats: Dict[str, float]
    tract_lambda: float
    tract_layer: str
    train_command: str
    tract_lambda_mode: str = 'absolute'
    license: str = 'apache-2.0'
    revision: Optional[str] = None  # the branch the card is published to (its snippets load `ORG/NAME@revision`)
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
    in_chans: int = 3


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


def training_command(args: Mapping[str, Any], flags: Optional[Mapping[str, argparse.Action]] = None) -> str:
    """The command line that reproduces a run from its `args.yaml`, with local paths as placeholders
    (`--data-dir <DATA_DIR>`).

    `timm-tract train` when the run has `tract_lambda` (our trainer), else timm's `python train.py`. Flags come from
    `flags` (dest -> argparse Action; default: `timm_tract.train.train_flags()`, whose names are train.py's): values
    equal to the default are left out, so the command parses back to the same args. Keys not among them (train.py-only
    flags) are
    spelled `--key-name` when set. Booleans become bare flags, lists space-separated values, dicts `k=v` pairs.
    """
    from .flags import train_flags
    ours = 'tract_lambda' in args
    actions = dict(train_flags() if flags is None else flags)
    program = ['timm-tract', 'train'] if ours else ['python', 'train.py']
    parts: List[str] = []
    first = ('model', 'data_dir', 'dataset')
    ordered = [(k, args[k]) for k in first if k in args] + [(k, v) for k, v in args.items() if k not in first]
    for key, value in ordered:
        if key in _NON_RECIPE_ARGS:
            continue
        value = _public_value(key, value)
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
            flag = max((o for o in action.option_strings if o.startswith('--')), key=len,
                       default=action.option_strings[0])
            if action.nargs == 0:  # store_true / store_false / store_const
                if value == action.const:
                    parts.append(flag)
                continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, dict):
            parts.append(' '.join([flag] + [_quote(f'{k}={v}') for k, v in value.items()]))
        elif isinstance(value, (list, tuple)):
            parts.append(' '.join([flag] + [_quote(str(v)) for v in value]))
        else:
            parts.append(f'{flag} {_quote(str(value))}')
    return ' \\\n  '.join([' '.join(program)] + parts)


def _quote(text: str) -> str:
    """Shell quoting, except for placeholders the reader replaces (`<DATA_DIR>`)."""
    return text if re.fullmatch(r'<[A-Z_]+>|[a-z-]+:<[A-Z_]+>', text) else shlex.quote(text)


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default and type(value) is type(default) or (value is None and default is None)


def _front_matter(info: CardInputs) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    dataset_type = info.dataset_id or info.dataset_name
    entries = []  # finite metrics only (CardInputs holds None for a NaN)
    for metric, name, value in (('accuracy', 'Top-1 Accuracy', info.top1),
                                ('top_5_accuracy', 'Top-5 Accuracy', info.top5)):
        if value is not None:
            entries.append(EvalResult(
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
        eval_results=entries or None,
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
        hub_id=info.repo_id + (f'@{info.revision}' if info.revision else ''),
        image_size=f'{h} x {w}',
        input_h=h,
        input_w=w,
        tract_paper=TRACT_PAPER_ID,
        citations=[TRACT_BIBTEX, _TIMM_BIBTEX],
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


@dataclasses.dataclass
class CardModel:
    """The published model and what describes it, computed once for the folder's files."""
    model: torch.nn.Module
    base: str
    layer: str
    tract: Dict[str, Any]
    data_config: Dict[str, Any]
    label_names: Optional[List[str]]
    epoch: Optional[int]
    metric: Optional[float]
    ema: bool


def _base_model_id(args: Dict[str, Any]) -> Optional[str]:
    """The Hub repo the run was fine-tuned from, when it started from Hub weights (the twin's cfg for a `*_tract`
    tag, e.g. a published `<arch>_tract.<tag>`, else the base architecture's)."""
    import timm.models
    model = str(args['model'])
    if hub_repo_id(model):
        return hub_repo_id(model)
    if not args.get('pretrained') or args.get('pretrained_path') or args.get('initial_checkpoint'):
        return None
    cfg = None
    for name in (model, f'{tract_base_arch(model)}.{split_model_name_tag(model)[1]}'):
        try:
            cfg = timm.models.get_pretrained_cfg(name.rstrip('.'))
        except (RuntimeError, ValueError):
            cfg = None
        if getattr(cfg, 'hf_hub_id', None):
            break
    hub_id = getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    return hub_id.split('@')[0] if hub_id else None


def _supports_features(base: str, kwargs: Dict[str, Any]) -> bool:
    import timm
    try:
        timm.create_model(base, features_only=True, device='meta', **kwargs)
    except Exception:  # timm raises various errors for architectures without a feature extractor
        return False
    return True


def card_inputs(run: RunInfo, weights: CardModel, repo_id: str, *, license: str = 'apache-2.0',
                dataset_name: Optional[str] = None, dataset_id: Optional[str] = None, base_model: Optional[str] = None,
                plot_file: Optional[str] = None, model_args: Optional[Mapping[str, Any]] = None,
                model_kwargs: Optional[Mapping[str, Any]] = None, revision: Optional[str] = None) -> CardInputs:
    """What the card of a published run states (`CardInputs`), computed from the run (args, history, recorded data
    facts, compare report) and the loaded weights; reads no file. Arguments as `model_card`."""
    ds_name, ds_id = dataset_names(run.args, dataset_name, dataset_id, run.data_facts)
    row = history_row(run.history, weights.epoch)
    model_args = dict(model_args or {})
    return CardInputs(
        repo_id=repo_id, base_arch=weights.base, tract_arch=twin_name(weights.base),
        num_classes=weights.model.num_classes, img_size=tuple(weights.data_config['input_size'][1:]),
        stats=model_stats(weights.model, weights.data_config['input_size']), tract_lambda=weights.tract['lambda'],
        tract_layer=weights.layer, tract_lambda_mode=weights.tract.get('lambda_mode', 'absolute'),
        train_command=training_command(run.args), license=license, revision=revision, label_names=weights.label_names,
        model_args={k: v for k, v in model_args.items() if k not in ('num_classes', 'global_pool', 'in_chans')
                    or (k == 'in_chans' and v != 3)},
        dataset_name=ds_name, dataset_id=ds_id, dataset_split=eval_split(run.args, run.data_facts),
        base_model=base_model or _base_model_id(run.args), checkpoint=run.checkpoint_kind, epoch=weights.epoch,
        epochs=run.args.get('epochs'), ema=weights.ema,
        top1=_finite(row['eval_top1']) if row else _finite(weights.metric),
        top5=_finite(row['eval_top5']) if row else None, results=results_rows(run.history),
        comparison=comparison_section(run.report), plot_file=plot_file,
        features_only=_supports_features(weights.base, dict(model_kwargs or {})),
        num_features=weights.model.num_features, in_chans=int(weights.data_config['input_size'][0]),
    )


def model_card(run: RunInfo, weights: CardModel, repo_id: str, *, license: str = 'apache-2.0',
               dataset_name: Optional[str] = None, dataset_id: Optional[str] = None, base_model: Optional[str] = None,
               plot_file: Optional[str] = None, model_args: Optional[Mapping[str, Any]] = None,
               model_kwargs: Optional[Mapping[str, Any]] = None, revision: Optional[str] = None,
               template_dir: Optional[Path] = None) -> str:
    """The whole model card (README.md text) of a published run, in one call: data set, training command, results,
    the compare section, model statistics and the usage snippets, rendered from the run and the loaded weights.

    `model_args` are the `model_args` of the published config.json; `model_kwargs` the create_model kwargs of the
    base architecture (used to tell whether it supports `features_only`); `revision` the branch the card goes to
    (its snippets then load `hf-hub:ORG/NAME@revision`)."""
    info = card_inputs(run, weights, repo_id, license=license, dataset_name=dataset_name, dataset_id=dataset_id,
                       base_model=base_model, plot_file=plot_file, model_args=model_args, model_kwargs=model_kwargs,
                       revision=revision)
    return render_model_card(info, template_dir)


def eval_results(info: CardInputs) -> Optional[Tuple[str, str]]:
    """(path in the repo, YAML text) of the `.eval_results/<data set>.yaml` file the Hub reads evaluation results
    from (huggingface_hub's `EvalResultEntry` schema): the published weights' top-1 accuracy (%) on the data set's Hub
    id. None when the data set has no Hub id or the run recorded no finite top-1 (the card's `model-index` then
    holds what there is)."""
    import yaml
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml
    from huggingface_hub.constants import EVAL_RESULTS_FOLDER

    if not info.dataset_id or info.top1 is None:
        return None
    entry = EvalResultEntry(
        dataset_id=info.dataset_id, task_id='default', value=round(info.top1, 3),
        notes=f'top-1 accuracy (%) on the {info.dataset_split} split; {info.base_arch} with a TrAct first layer '
              f'(λ = {info.tract_lambda})')
    name = re.sub(r'[^\w.-]', '_', info.dataset_id.split('/')[-1])
    return (f'{EVAL_RESULTS_FOLDER}/{name}.yaml',
            yaml.safe_dump(eval_result_entries_to_yaml([entry]), sort_keys=False, allow_unicode=True))


def _curve(c: Any) -> Optional[Dict[str, Any]]:
    """A well-formed curve of a compare report (method, budget, per-epoch mean and std of finite numbers)."""
    if not isinstance(c, Mapping) or c.get('method') not in METHODS:
        return None
    epochs, mean, std = c.get('epochs'), c.get('mean'), c.get('std')
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not isinstance(mean, list) \
            or not isinstance(std, list) or len(mean) != len(std) or not mean:
        return None
    if any(_finite(v) is None for v in mean + std):
        return None
    return {'method': c['method'], 'epochs': epochs, 'mean': [float(v) for v in mean], 'std': [float(v) for v in std]}


def comparison_plot(report: Optional[Mapping[str, Any]], dataset_name: str, path: Path) -> bool:
    """Render the card's accuracy plot (PNG at `path`) from a compare report's type-checked numbers and public names
    only: the title names the data set by `dataset_name`, never by a path; no picture from a file is copied.
    False (nothing written) when the report has no usable table."""
    from .compare.report import plot_report

    rows = table_rows(report or {})
    if not rows:
        return False
    table = [dataclasses.asdict(r) for r in rows]
    try:
        best = speedup(table)
    except (ValueError, KeyError):
        return False
    seeds = [s for s in (report.get('seeds') or []) if isinstance(s, int) and not isinstance(s, bool)]
    labels = _method_labels(report)
    plot_report({'baseline_label': labels['baseline'], 'tract_label': labels['tract'], 'data': dataset_name,
                 'table': table, 'curves': [c for c in map(_curve, report.get('curves') or []) if c is not None],
                 'speedup': best, 'seeds': seeds}, str(path))
    return True
