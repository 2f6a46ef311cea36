""" Publish a TrAct training run to the Hugging Face Hub: a timm-loadable repository with a model card.

The steps follow timm's own split (`save_for_hf` writes, `generate_readme` formats, `push_to_hf_hub` uploads):
`timm_tract.rundir.read_run` reads the run, `build_repo_folder` writes the repository folder (weights and config
through timm's `save_for_hf`, the card through `timm_tract.cards`), `publish` uploads it in one commit. Both take one
`PublishOptions`. The folder holds:

  model.safetensors   the chosen checkpoint's weights (EMA when present), no optimizer state, no pickle
  config.json         timm's schema for the *base* architecture (`timm.create_model('hf-hub:ORG/NAME')` needs only
                      timm), label names, data config and a `tract` block (λ, layer, the `*_tract` twin)
  README.md           model card (`timm_tract.cards`)
  train_hparams.yaml  the run's args, local paths as placeholders; results.csv: its summary.csv;
                      accuracy.png: the compare plot, for runs of `timm-tract compare`

  .eval_results/<data set>.yaml  the top-1 accuracy in the Hub's evaluation-results format, when the data set has
                      a Hub id

Guarantees: the repo id and the revision are checked before anything is read; publishing reads only the run
directory (a file or folder reached through a symbolic link that leaves it is refused, naming the link), the compare
report of the compare directory that lists the run, and the files the user names (`--checkpoint PATH`,
`--label-names FILE`): label names and the data set come from `data_facts.json`, recorded by `timm-tract train`.
Published text and pictures hold public names only (local paths become placeholders at every depth; the accuracy
plot is re-rendered from the report's numbers). The folder is built in a temporary directory and renamed into place
(a failure leaves nothing, also no empty `RUN_DIR/hub/`). Every Hub request has a timeout (`PublishOptions.timeout`,
default `$TIMM_TRACT_HUB_TIMEOUT` or 60 s), and every Hub call (create, list, branch, the commit with its LFS upload) is
retried on network errors, timeouts and 5xx/429 answers with exponential backoff (a 429's `Retry-After` is honoured),
then fails with one message naming the stage.
"""
import contextlib
import dataclasses
import email.utils
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import torch

from . import rundir
from .cards import CardModel, card_inputs, comparison_plot, eval_results, public_args, render_model_card
from .errors import PublishError, RunDirError
from .functional import DEFAULT_LAMBDA, DEFAULT_LAMBDA_MODE, LAMBDA_MODES
from .naming import (TRACT_PAPER_ID, is_tract_optimizer, is_weights_source, repo_tag, split_model_name_tag,
                     tract_base_arch, twin_name)
from .version import __version__

__all__ = ['PublishOptions', 'PublishResult', 'read_run', 'read_label_names', 'check_repo_id', 'check_revision',
           'check_label_names', 'build_repo_folder', 'publish', 'TIMEOUT_ENV']

_logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
T = TypeVar('T')

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CFG_KEYS_NOT_PUBLISHED = ('paper_name', 'description', 'notes', 'origin_url', 'test_input_size', 'test_crop_pct',
                           'label_names', 'label_descriptions', 'file', 'tract_lambda')
# create_model arguments that say where weights come from on one machine, not what the architecture is
_LOADING_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir')
TIMEOUT_ENV = 'TIMM_TRACT_HUB_TIMEOUT'
DEFAULT_TIMEOUT = 60.0
_MAX_RETRY_AFTER = 600.0  # seconds: a longer wait asked by the Hub fails the stage instead
# git ref names (git check-ref-format): no control characters, space, ~ ^ : ? * [ \, "..", "@{", "//"
_BAD_REVISION = re.compile(r'[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|/\.|[/.]$|\.lock$|\.lock/|^@$')


def _default_timeout() -> float:
    """`$TIMM_TRACT_HUB_TIMEOUT` (seconds) when set, else 60."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        return float(value)
    except ValueError:
        raise PublishError(f'{TIMEOUT_ENV}={value!r} is not a number of seconds; set it to e.g. 60 or unset '
                           f'it') from None


def check_revision(revision: Optional[str]) -> None:
    """A branch name the Hub accepts (git's ref-name rules; `refs/pr/N` names a pull request); None = main."""
    if revision is None:
        return
    if not isinstance(revision, str) or not revision or len(revision) > 200 or _BAD_REVISION.search(revision):
        raise PublishError(f'--revision {revision!r} is not a valid branch name: use letters, digits, "-", "_", "." '
                           f'and "/" (no spaces, "..", "~^:?*[\\" or a leading "-"), e.g. --revision dev')


def check_label_names(names: Sequence[str], source: str) -> List[str]:
    """Label names fit for config.json: non-empty text that encodes as UTF-8 (a lone surrogate, e.g. from a folder
    name that is not UTF-8, is refused, naming the entry)."""
    names = list(names)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise PublishError(f'label names must be non-empty strings; entry {i} of {source} is {name!r}')
        try:
            name.encode('utf-8')
        except UnicodeEncodeError:
            raise PublishError(f'label name {i} of {source} ({ascii(name)}) is not valid Unicode text (a folder name '
                               f'that is not UTF-8?); give the class names with --label-names FILE') from None
    return names


@dataclasses.dataclass
class PublishOptions:
    """How to turn a run into a repository (first group) and how to upload it (second group).

    checkpoint: 'best', 'last' or a checkpoint path; use_ema: publish EMA weights when the checkpoint has them;
    label_names: class names (default: recorded by training in the run's data_facts.json); dataset_name/dataset_id:
    the card's data set (default: known from the run); base_model: Hub repo the run was fine-tuned from (default:
    from the run's args).
    token: Hub token (default HF_TOKEN / login; never printed or written); revision: the branch to commit to (created
    if missing; checked before anything is read); overwrite: replace the files of a repo that has some (else
    refused); retries: per Hub call, on network errors, timeouts and 5xx/429 answers, waiting backoff·2^k seconds (a
    429's Retry-After instead); timeout: seconds each Hub request may wait for the connection or the next bytes
    (default: $TIMM_TRACT_HUB_TIMEOUT, else 60).
    """
    checkpoint: str = 'best'
    use_ema: bool = True
    license: str = 'apache-2.0'
    label_names: Optional[Sequence[str]] = None
    dataset_name: Optional[str] = None
    dataset_id: Optional[str] = None
    base_model: Optional[str] = None
    token: Optional[str] = None
    endpoint: Optional[str] = None
    private: bool = False
    revision: Optional[str] = None
    commit_message: Optional[str] = None
    create_pr: bool = False
    overwrite: bool = False
    retries: int = 4
    backoff: float = 2.0
    timeout: float = dataclasses.field(default_factory=_default_timeout)

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise PublishError(f'retries must be an integer >= 0, got {self.retries!r}')
        if not isinstance(self.backoff, (int, float)) or self.backoff < 0:
            raise PublishError(f'backoff must be a number of seconds >= 0, got {self.backoff!r}')
        if not isinstance(self.checkpoint, (str, os.PathLike)) or not str(self.checkpoint):
            raise PublishError(f'checkpoint must be best, last or a checkpoint path, got {self.checkpoint!r}')
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not (
                math.isfinite(self.timeout) and self.timeout > 0):
            raise PublishError(f'timeout must be a number of seconds > 0, got {self.timeout!r} (also from '
                               f'{TIMEOUT_ENV})')
        check_revision(self.revision)
        if self.label_names is not None:
            check_label_names(self.label_names, 'the given label names')


@dataclasses.dataclass
class PublishResult:
    """Where the repository folder was written (dry run) and what was uploaded. `load_name` is the model name that
    loads the result with `timm.create_model(load_name, pretrained=True)`: `local-dir:<folder>` for a folder,
    `hf-hub:ORG/NAME` for main, `hf-hub:ORG/NAME@<revision>` for a branch or a pull request (timm's `@` syntax)."""
    repo_id: str
    folder: Optional[Path] = None
    repo_url: Optional[str] = None
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    manifest_entry: Dict[str, Any] = dataclasses.field(default_factory=dict)
    revision: Optional[str] = None
    load_name: str = ''


def _options(options: Optional[PublishOptions], kwargs: Dict[str, Any]) -> PublishOptions:
    if options is not None and kwargs:
        raise TypeError('pass either a PublishOptions or keyword options, not both')
    if options is not None:
        return options
    try:
        return PublishOptions(**kwargs)
    except TypeError as e:
        raise TypeError(f'unknown publish option ({e}); see timm_tract.hub.PublishOptions') from None


def read_run(run_dir: PathLike, checkpoint: str = 'best') -> rundir.RunInfo:
    """`timm_tract.rundir.read_run`, its errors as PublishError."""
    try:
        return rundir.read_run(run_dir, checkpoint)
    except RunDirError as e:
        raise PublishError(str(e)) from None


def read_label_names(path: PathLike) -> List[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PublishError(f'cannot read the label names file {path} ({type(e).__name__}: '
                           f'{getattr(e, "strerror", None) or e}); give a text file with one class name per line')
    if not names:
        raise PublishError(f'the label names file {path} is empty; give one class name per line')
    return names


def check_repo_id(repo_id: str) -> None:
    """ORG/NAME, valid for the Hub (huggingface_hub's own validator)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    parts = repo_id.split('/') if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(parts):
        raise PublishError(f'--repo-id must be ORG/NAME (e.g. myname/resnet18_tract.tract_cifar10), got {repo_id!r}')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f'--repo-id {repo_id!r} is not a valid Hub repo id ({" ".join(str(e).split())}); use '
                           f'ORG/NAME with letters, digits, "-", "_" and "."') from None


# ---------------------------------------------------------------------------------------------- the model
def _run_arch(run: rundir.RunInfo, meta: Dict[str, Any]) -> str:
    """The architecture the run trained: recorded by `timm-tract train` (`architecture`), else the checkpoint's or the
    args' model name without its tag."""
    recorded = run.args.get('architecture')
    if isinstance(recorded, str) and recorded:
        return recorded
    name = str(meta.get('arch') or run.args['model'])
    if is_weights_source(name):
        raise PublishError(f'{run.run_dir} was trained from {name}, and its args.yaml does not record the '
                           f'architecture (runs of timm-tract train do): train from a registered architecture')
    return split_model_name_tag(name)[0]


def _base_arch(arch: str) -> str:
    import timm
    base = tract_base_arch(arch) or arch
    if not timm.is_model(base):
        raise PublishError(f'architecture {base!r} (from {arch!r}) is not a timm model; cannot publish it')
    return base


def _tract_settings(args: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """λ and how TrAct was used: recorded TrAct layers (timm-tract train), a `*_tract` model, or a `tract-*`
    optimizer."""
    opt = str(args.get('opt') or '')
    via_model = bool(args.get('tract_layers')) or tract_base_arch(arch) is not None
    via_opt = is_tract_optimizer(opt)
    if 'tract_layers' in args and not args['tract_layers']:
        via_model = via_opt = False  # recorded by timm-tract train: the built model had no TrAct layer
    if not (via_model or via_opt):
        raise PublishError(
            f'this run did not train with TrAct (model {arch!r}, optimizer {opt!r}): publish it with timm\'s '
            f'push_to_hf_hub instead, or train with a *_tract model or a tract-* optimizer')
    lam, mode = _recorded_setting(args, 'tract_lambda'), _recorded_setting(args, 'tract_lambda_mode')
    if not isinstance(lam, (int, float, type(None))) or isinstance(lam, bool):
        raise PublishError(f'args.yaml has tract_lambda {lam!r}, not a number; fix the file')
    if mode not in (None, *LAMBDA_MODES):
        raise PublishError(f'args.yaml has tract_lambda_mode {mode!r}, not one of {LAMBDA_MODES}; fix the file')
    return {'lambda': float(lam if lam is not None else DEFAULT_LAMBDA), 'lambda_mode': mode or DEFAULT_LAMBDA_MODE,
            'via': 'model' if tract_base_arch(arch) is not None or not via_opt else 'optimizer', 'optimizer': opt}


def _recorded_setting(args: Dict[str, Any], key: str) -> Any:
    """A TrAct setting of the run: its own flag (`--tract-lambda`), else `--opt-kwargs` / `--model-kwargs`."""
    value = args.get(key)
    for kw in ('opt_kwargs', 'model_kwargs'):
        kwargs = args.get(kw) or {}
        if value is None and isinstance(kwargs, dict) and kwargs.get(key) is not None:
            value = kwargs[key]
    return value


def _model_kwargs(args: Dict[str, Any]) -> Dict[str, Any]:
    """The base architecture's create_model kwargs: the run's --model-kwargs less TrAct's and the ones that locate
    weights (`pretrained_cfg_overlay={'file': ...}`), plus in_chans and global_pool."""
    given = args.get('model_kwargs') or {}
    kwargs = {k: v for k, v in given.items() if not k.startswith('tract') and k not in _LOADING_KWARGS} \
        if isinstance(given, dict) else {}
    in_chans = args.get('in_chans') or ((args.get('input_size') or [None])[0])
    if in_chans:
        kwargs['in_chans'] = int(in_chans)
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    return kwargs


def _build_base_model(base: str, sd: Dict[str, torch.Tensor], args: Dict[str, Any]) -> torch.nn.Module:
    """The plain timm model with the run's weights loaded strictly (TrAct weights are plain weights)."""
    import timm

    kwargs = _model_kwargs(args)
    probe = timm.create_model(base, device='meta', **kwargs)
    classifier = probe.pretrained_cfg.get('classifier')
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    weight = sd.get(f'{classifier}.weight') if classifier else None
    num_classes = int(weight.shape[0]) if weight is not None else args.get('num_classes')
    if num_classes is None:
        raise PublishError(f'cannot tell the number of classes: no {classifier}.weight in the checkpoint '
                           f'and no num_classes in args.yaml')
    model = timm.create_model(base, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PublishError(f'the checkpoint does not match {base}(num_classes={num_classes}, {kwargs}): '
                           f'{" ".join(str(e).split())[:300]}') from None
    return model.eval()


def _label_names(run: rundir.RunInfo, num_classes: int, given: Optional[Sequence[str]]) -> Optional[List[str]]:
    """Class names: the given ones (--label-names), else those recorded at training time in the run's
    data_facts.json; None (said in the log) for a run without them. Nothing outside the run is read."""
    if given is not None:
        names = check_label_names(given, 'the given label names')
        if len(names) != num_classes:
            raise PublishError(f'{len(names)} label names given for a model with {num_classes} classes')
        return names
    facts = run.data_facts
    if facts is None:
        _logger.warning(f'{run.run_dir} has no {rundir.DATA_FACTS_FILE} (written by timm-tract train since it records '
                        f'the data\'s label names): publishing without label names; give them with --label-names FILE')
        return None
    if facts.label_names is None:
        _logger.warning('the run\'s data did not name its classes: publishing without label names; give them with '
                        '--label-names FILE')
        return None
    names = check_label_names(facts.label_names, str(run.run_dir / rundir.DATA_FACTS_FILE))
    if len(names) != num_classes:
        _logger.warning(f'ignoring {len(names)} recorded class names for a {num_classes}-class model; use '
                        f'--label-names')
        return None
    return names


# ---------------------------------------------------------------------------------------------- the folder
def _load_model(run: rundir.RunInfo, options: PublishOptions) -> CardModel:
    from timm.data import resolve_data_config
    from .layers import find_first_layer
    try:
        sd, meta, ema = rundir.load_weights(run.checkpoint_path, options.use_ema)
    except RunDirError as e:
        raise PublishError(str(e)) from None
    arch = _run_arch(run, meta)
    base = _base_arch(arch)
    tract = _tract_settings(run.args, arch)
    model = _build_base_model(base, sd, run.args)
    epoch, metric = meta.get('epoch'), meta.get('metric')
    return CardModel(
        model=model, base=base, layer=', '.join(find_first_layer(model)), tract=tract,
        data_config=resolve_data_config(run.args, model=model),
        label_names=_label_names(run, model.num_classes, options.label_names),
        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
        metric=float(metric) if isinstance(metric, (int, float)) and not isinstance(metric, bool) else None, ema=ema)


def _write_weights_and_config(w: CardModel, repo_id: str, license: str, folder: Path) -> None:
    """model.safetensors + config.json through timm's save_for_hf, under the base architecture."""
    from timm.models import save_for_hf
    tag = repo_tag(repo_id)
    for key in _CFG_KEYS_NOT_PUBLISHED:
        w.model.pretrained_cfg.pop(key, None)
    tract_arch = twin_name(w.base)
    model_config: Dict[str, Any] = {
        'pretrained_cfg': {
            'tag': tag, 'license': license, 'paper_ids': TRACT_PAPER_ID,
            'notes': (f'First layer {w.layer} trained with TrAct (lambda={w.tract["lambda"]}); '
                      f'continue TrAct training with {tract_arch} from timm-tract.',),
        },
        'tract': {
            'used': True, 'lambda': w.tract['lambda'], 'lambda_mode': w.tract['lambda_mode'], 'layer': w.layer,
            'arch': tract_arch,
            'applied_via': w.tract['via'], 'optimizer': w.tract['optimizer'], 'paper': TRACT_PAPER_ID,
            'timm_tract_version': __version__,
        },
    }
    if w.label_names:
        model_config['label_names'] = w.label_names
    save_for_hf(w.model, str(folder), model_config=model_config, safe_serialization=True, data_config=w.data_config)
    produced = sorted(p.name for p in folder.iterdir())
    if produced != ['config.json', 'model.safetensors']:
        raise PublishError(f'timm wrote unexpected files {produced}; expected config.json and model.safetensors')


def _write_run_files(run: rundir.RunInfo, folder: Path, dataset_name: str) -> Optional[str]:
    """train_hparams.yaml (local paths as placeholders), results.csv (the run's summary.csv) and, for a run of
    `timm-tract compare`, accuracy.png rendered from the report's numbers; returns the plot's name."""
    import yaml
    (folder / 'train_hparams.yaml').write_text(yaml.safe_dump(public_args(run.args), default_flow_style=False))
    summary = run.run_dir / rundir.SUMMARY_FILE
    if os.path.lexists(summary):
        summary = _inside_run(summary, run.run_dir)
        if summary.is_file():
            shutil.copyfile(summary, folder / 'results.csv')
    if run.report is None or not comparison_plot(run.report, dataset_name, folder / 'accuracy.png'):
        return None
    return 'accuracy.png'


def _inside_run(path: Path, base: Path) -> Path:
    try:
        return rundir.contained(path, base)
    except RunDirError as e:
        raise PublishError(str(e)) from None


def _write_card(run: rundir.RunInfo, w: CardModel, repo_id: str, options: PublishOptions, folder: Path) -> None:
    """README.md (the card), accuracy.png and the `.eval_results/` file, all from the same `CardInputs`."""
    model_args = json.loads((folder / 'config.json').read_text()).get('model_args', {})
    # a card on a branch loads from it; a pull request's ref is not known yet, and after the merge it is main's
    revision = None if options.create_pr else options.revision
    kwargs = dict(license=options.license, dataset_name=options.dataset_name, dataset_id=options.dataset_id,
                  base_model=options.base_model, model_args=model_args, model_kwargs=_model_kwargs(run.args),
                  revision=revision)
    info = card_inputs(run, w, repo_id, **kwargs)
    info.plot_file = _write_run_files(run, folder, info.dataset_name)
    (folder / 'README.md').write_text(render_model_card(info))
    results = eval_results(info)
    if results is not None:
        path, text = results
        (folder / path).parent.mkdir()
        (folder / path).write_text(text)


def _manifest_entry(w: CardModel, repo_id: str, license: str) -> Dict[str, Any]:
    tag = repo_tag(repo_id)
    dc = w.data_config
    return {'model': f'{twin_name(w.base)}.{tag}', 'hf_hub_id': repo_id, 'num_classes': w.model.num_classes,
            'input_size': list(dc['input_size']), 'mean': list(dc['mean']), 'std': list(dc['std']),
            'crop_pct': dc['crop_pct'], 'interpolation': dc['interpolation'], 'license': license}


def _write_folder(run: rundir.RunInfo, repo_id: str, options: PublishOptions, folder: Path) -> Dict[str, Any]:
    """Write every repository file into the (empty) `folder`; returns the manifest entry for these weights."""
    weights = _load_model(run, options)
    _write_weights_and_config(weights, repo_id, options.license, folder)
    _write_card(run, weights, repo_id, options, folder)
    return _manifest_entry(weights, repo_id, options.license)


def _publish_modes(folder: Path) -> None:
    """Files mode 0644 and folders 0755: the temp dir was made 0700."""
    for p in folder.rglob('*'):
        p.chmod(0o755 if p.is_dir() else 0o644)
    folder.chmod(0o755)


def build_repo_folder(run_dir: PathLike, repo_id: str, output_dir: PathLike,
                      options: Optional[PublishOptions] = None, **kwargs: Any) -> PublishResult:
    """Write the Hub repository folder for a run into `output_dir`, all or nothing.

    `options` (or its fields as keywords) as `PublishOptions`. The files are written into a temporary sibling folder
    and renamed into place at the end, so a failure leaves no partial folder (and creates no parent folder). An
    existing non-empty `output_dir` is refused: nothing of the user's is overwritten.
    """
    options = _options(options, kwargs)
    check_repo_id(repo_id)
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublishError(f'output folder {out} already exists and is not empty; remove it or choose another '
                           f'--output-dir (nothing was written)')
    run = read_run(run_dir, options.checkpoint)
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        entry = _write_folder(run, repo_id, options, tmp)
        _publish_modes(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # innermost first: leave no empty folder we made (e.g. RUN_DIR/hub/)
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return PublishResult(repo_id=repo_id, folder=out, manifest_entry=entry, load_name=f'local-dir:{out}')


# ---------------------------------------------------------------------------------------------- upload
def _network_cause(e: BaseException) -> Optional[BaseException]:
    """The HTTP or transport error behind `e`: huggingface_hub wraps a failed LFS upload in a RuntimeError."""
    from huggingface_hub.errors import HfHubHTTPError
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (HfHubHTTPError,) + _transport_errors()):
            return e
        e = e.__cause__ or e.__context__
    return None


def _retry_after(error: BaseException) -> Optional[float]:
    """Seconds a 429/503 answer's `Retry-After` header asks to wait (a number or an HTTP date), else None."""
    response = getattr(error, 'response', None)
    value = response.headers.get('Retry-After') if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retrying(what: str, fn: Callable[[], T], retries: int, backoff: float) -> T:
    """Call `fn`, retrying network errors, timeouts and 5xx/429 answers with exponential backoff, or after the
    `Retry-After` the Hub asks for (also when huggingface_hub wraps them, as for the LFS upload); a clear
    PublishError naming the stage otherwise."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    error = 'no attempt made'
    for attempt in range(retries + 1):
        asked = None
        try:
            return fn()
        except RevisionNotFoundError:
            raise  # the caller decides (e.g. create the branch)
        except Exception as e:
            cause = _network_cause(e)
            if cause is None:
                raise
            if isinstance(cause, HfHubHTTPError):
                status = cause.response.status_code if cause.response is not None else None
                if status in (401, 403):
                    raise PublishError(
                        f'{what}: the Hub refused the credentials (HTTP {status}). Log in with `hf auth login`, set '
                        f'HF_TOKEN, or pass --token with a token that has write access to this namespace') from None
                if isinstance(cause, RepositoryNotFoundError) or status not in _RETRY_STATUS:
                    raise PublishError(f'{what} failed (HTTP {status}): {_server_message(cause)}') from None
                error = f'HTTP {status}'
                asked = _retry_after(cause)
                if asked is not None and asked > _MAX_RETRY_AFTER:
                    raise PublishError(f'{what} failed (HTTP {status}): the Hub asks to wait {asked:.0f} s '
                                       f'(Retry-After); run the command again later') from None
            else:
                error = f'{type(cause).__name__}: {" ".join(str(cause).split())[:200]}'
        if attempt < retries:
            wait = asked if asked is not None else backoff * 2 ** attempt
            _logger.warning(f'{what}: {error}; retrying in {wait:.1f}s'
                            + (' (Retry-After)' if asked is not None else '') + f' ({attempt + 1}/{retries})')
            time.sleep(wait)
    raise PublishError(
        f'{what} failed after {retries + 1} attempts ({error}). Check the network connection and the Hub endpoint '
        f'(HF_ENDPOINT), then run the command again') from None


def _transport_errors() -> Tuple[type, ...]:
    """Connection-level errors of the HTTP stack huggingface_hub uses (httpx in >= 1.0, requests before), and the
    OSError of a connection dropped mid-upload."""
    errors: Tuple[type, ...] = (ConnectionError, TimeoutError)
    try:
        from huggingface_hub.utils import httpx
        errors += (httpx.TransportError,)
    except ImportError:
        import requests
        errors += (requests.ConnectionError, requests.Timeout)
    return errors


@contextlib.contextmanager
def _hub_timeouts(seconds: float) -> Iterator[None]:
    """Every HTTP request huggingface_hub makes meanwhile waits at most `seconds` to connect and for each read/write
    (its shared client has no timeout): the client factory in use is wrapped, so a proxy or other setting a user
    configured stays, and restored afterwards. The Xet transfer (hf_xet, not HTTP through huggingface_hub) keeps its
    own timeouts."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http, httpx

    previous = getattr(_http, '_GLOBAL_CLIENT_FACTORY', None) or _http.default_client_factory
    limit = httpx.Timeout(seconds)

    def _bounded(request) -> None:  # requests that pass timeout=None explicitly get the limit too
        timeouts = request.extensions.get('timeout') or {}
        request.extensions['timeout'] = {k: timeouts.get(k) or seconds for k in ('connect', 'read', 'write', 'pool')}

    def factory():
        client = previous()
        client.timeout = limit
        hooks = client.event_hooks
        client.event_hooks = {'request': [*hooks.get('request', []), _bounded], 'response': hooks.get('response', [])}
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _server_message(e: Exception) -> str:
    message = getattr(e, 'server_message', None) or str(e)
    return message.strip().splitlines()[0] if message.strip() else type(e).__name__


def _existing_files(api, repo_id: str, branch: str, options: PublishOptions) -> List[str]:
    from huggingface_hub.errors import RevisionNotFoundError
    try:
        files = _retrying('listing the repository', lambda: api.list_repo_files(repo_id, revision=branch),
                          options.retries, options.backoff)
    except RevisionNotFoundError:
        _logger.info(f'creating branch {branch}')
        _retrying('create_branch', lambda: api.create_branch(repo_id, branch=branch, exist_ok=True),
                  options.retries, options.backoff)
        files = []
    return [f for f in files if f != '.gitattributes']


def _upload(folder: Path, repo_id: str, options: PublishOptions) -> Tuple[str, Any]:
    """create_repo (existing accepted), refuse a repo with files unless overwrite/create_pr, then one commit: the
    LFS upload of the weights and the commit are one retried stage (a failed attempt commits nothing). Returns the
    repo URL and huggingface_hub's CommitInfo."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=options.endpoint, token=options.token, library_name='timm-tract',
                library_version=__version__)
    _logger.info(f'creating {repo_id} on {api.endpoint} (private={options.private})')
    repo_url = _retrying('create_repo',
                         lambda: api.create_repo(repo_id, private=options.private, exist_ok=True),
                         options.retries, options.backoff)
    branch = options.revision or 'main'
    existing = _existing_files(api, repo_id, branch, options)
    if existing and not (options.overwrite or options.create_pr):
        raise PublishError(
            f'{repo_id}@{branch} already has files ({", ".join(sorted(existing)[:5])}'
            f'{", ..." if len(existing) > 5 else ""}); nothing was uploaded. Pass --overwrite to replace them, or '
            f'--create-pr to propose the change')
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    size = sum(f.stat().st_size for f in files) / 1e6
    _logger.info(f'uploading {len(files)} files ({size:.1f} MB) in one commit to {repo_id}@{branch}'
                 + (' as a pull request' if options.create_pr else ''))
    info = _retrying('upload_folder (LFS upload of model.safetensors and the commit)', lambda: api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=options.revision, create_pr=options.create_pr,
        commit_message=options.commit_message or f'Publish TrAct weights with timm-tract {__version__}',
        delete_patterns='*' if (options.overwrite and not options.create_pr) else None,
    ), options.retries, options.backoff)
    return str(repo_url), info


def publish(run_dir: PathLike, repo_id: str, options: Optional[PublishOptions] = None, *, dry_run: bool = False,
            output_dir: Optional[PathLike] = None, **kwargs: Any) -> PublishResult:
    """Build the repository folder for a run and upload it as one commit (or only write it: dry run).

    `options` (or its fields as keywords) as `PublishOptions`. With `dry_run` or `output_dir` the folder is written
    to `output_dir` (default `RUN_DIR/hub/<NAME>`) and nothing is uploaded. Otherwise it is built in a temporary
    folder, `create_repo` runs (accepting an existing repo), and `upload_folder` makes one commit; a repo that
    already has files is refused unless `overwrite` (which then replaces every file) or `create_pr`.
    """
    options = _options(options, kwargs)
    check_repo_id(repo_id)
    if dry_run or output_dir is not None:
        out = Path(output_dir) if output_dir is not None else Path(run_dir) / 'hub' / repo_id.split('/')[-1]
        if output_dir is None and os.path.lexists(out.parent):
            _inside_run(out.parent, Path(run_dir))  # a RUN_DIR/hub link out of the run is not written through
        _logger.info(f'writing the repository folder to {out} (nothing is uploaded)')
        return build_repo_folder(run_dir, repo_id, out, options)
    with tempfile.TemporaryDirectory(prefix='timm-tract-publish-') as tmp:
        result = build_repo_folder(run_dir, repo_id, Path(tmp) / 'repo', options)
        with _hub_timeouts(options.timeout):
            repo_url, info = _upload(result.folder, repo_id, options)
    revision = getattr(info, 'pr_revision', None) if options.create_pr else options.revision
    return dataclasses.replace(result, folder=None, repo_url=repo_url, commit_url=info.commit_url, pr_url=info.pr_url,
                               revision=revision, load_name=f'hf-hub:{repo_id}' + (f'@{revision}' if revision else ''))
