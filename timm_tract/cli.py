""" `timm-tract` command line: thin argument parsing over the package's functions.

Exit codes: 0 success; 2 a user error (bad flag or value, missing file, a run that cannot be resumed, a Hub call that
kept failing, stdout closed early as in `timm-tract data | true`), reported as one line on stderr; 130 interrupted
(Ctrl-C); 143 stopped by SIGTERM (compare: workers stopped, partial report written, the same command resumes).
`--debug` (or TIMM_TRACT_DEBUG=1) adds the traceback of user errors; programming errors always show theirs.
"""
import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from .version import __version__


def _command_args(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed flags without the subcommand plumbing (`func`, `command`, `debug`)."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ('func', 'command', 'debug')})


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage of `train` alone is 60 lines): `prog: error: ... (see prog --help)`."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _add_data(sub) -> None:
    p = sub.add_parser(
        'data', help='print the path of a data set ready for --data-dir: the embedded one (default) or Fashion-MNIST',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Prepare a data set and print its root on stdout (usable as --data-dir '
                    '"$(timm-tract data ...)").\n\n'
                    'embedded (default): real digit scans on real photographs, 32x32 RGB, 10 classes, train/ and '
                    'validation/ ImageFolder, built on first use (~10 s) in $TIMM_TRACT_DATA, else '
                    '~/.cache/timm-tract/.\n'
                    'fashion-mnist: Zalando\'s Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale) from local '
                    'files (apt-get install dataset-fashion-mnist, or --source DIR), laid out as torchvision\'s '
                    'ROOT/FashionMNIST/raw/ for --dataset torch/fashion_mnist --data-dir ROOT --in-chans 1.')
    p.add_argument('name', nargs='?', default='embedded', choices=('embedded', 'fashion-mnist'),
                   help='data set (default: embedded)')
    p.add_argument('--root', default=None,
                   help='data set directory (default: $TIMM_TRACT_DATA for the embedded set, else the user cache)')
    p.add_argument('--rebuild', action='store_true', help='write the data set again even if it exists')
    p.add_argument('--source', default=None, metavar='DIR',
                   help='fashion-mnist: folder with the four *-ubyte[.gz] files (default: $TIMM_TRACT_FASHION_MNIST, '
                        'else /usr/share/datasets/fashion-mnist)')
    p.add_argument('--subset', type=int, nargs=2, default=None, metavar=('N_TRAIN', 'N_VAL'),
                   help='fashion-mnist: a development split of the training set (first N_TRAIN images train, last '
                        'N_VAL images as the validation/test split); the official test set is not used')
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from .data import (MANIFEST, build_data, default_data_dir, ensure_data, fashion_mnist_dir, prepare_fashion_mnist,
                       read_manifest)

    if args.name == 'fashion-mnist':
        import json
        subset = tuple(args.subset) if args.subset else None
        root = prepare_fashion_mnist(args.root or fashion_mnist_dir(subset), source=args.source, subset=subset,
                                     overwrite=args.rebuild)
        manifest = json.loads((root / MANIFEST).read_text())
        counts = {split: sum(c.values()) for split, c in manifest['counts'].items()}
        print(root)
        print(f"{manifest['display_name']} ({manifest['hub_id']}): 10 classes, 28x28 grayscale, train "
              f"{counts['train']} / validation {counts['validation']} images"
              f"{' (development subset of the training set)' if subset else ' (validation = the official test set)'}"
              f"; mean {manifest['mean'][0]} std {manifest['std'][0]}\n"
              f"use: --dataset torch/fashion_mnist --data-dir {root} --in-chans 1 --img-size 28 --crop-pct 1 "
              f"--mean {manifest['mean'][0]} --std {manifest['std'][0]}", file=sys.stderr)
        return 0
    if args.source or args.subset:
        from .errors import DataError
        raise DataError('--source and --subset apply to `timm-tract data fashion-mnist` only.')
    root = args.root or default_data_dir()
    if args.rebuild:
        build_data(root, overwrite=True)
    root = ensure_data(root)
    manifest = read_manifest(root)
    counts = manifest['counts']
    print(root)
    print(f"{manifest['name']}: {manifest['num_classes']} classes, {manifest['img_size']}x{manifest['img_size']} RGB, "
          f"train {sum(counts['train'].values())} / validation {sum(counts['validation'].values())} images; "
          f"mean {manifest['mean']} std {manifest['std']}", file=sys.stderr)
    return 0


def _add_publish(sub) -> None:
    p = sub.add_parser(
        'publish', help='publish a training run to the Hugging Face Hub (timm-loadable weights + model card)',
        description='Turn a train.py-layout run (args.yaml, summary.csv, model_best.pth.tar, ...) into a Hub model '
                    'repository: model.safetensors, config.json (base architecture, loads with plain timm), README.md '
                    'model card, train_hparams.yaml, results.csv; then create the repo and upload it in one commit. '
                    'The token comes from --token, HF_TOKEN or `hf auth login` and is never printed or written.')
    p.add_argument('run_dir', metavar='RUN_DIR', help='training output directory')
    p.add_argument('--repo-id', required=True,
                   help='ORG/NAME of the Hub repository, e.g. me/resnet18_tract.tract_cifar10')
    p.add_argument('--checkpoint', default='best', help='best (default), last, or a checkpoint file path')
    p.add_argument('--no-ema', action='store_true', help='publish the raw weights even when the run has EMA weights')
    p.add_argument('--dry-run', action='store_true', help='only write the repository folder (RUN_DIR/hub/NAME)')
    p.add_argument('--output-dir', default=None, help='write the repository folder here and upload nothing')
    p.add_argument('--license', default='apache-2.0', help='license id for the card (default apache-2.0)')
    p.add_argument('--label-names', default=None,
                   help='text file with one class name per line (default: from the data)')
    p.add_argument('--dataset-id', default=None, help='Hub dataset id for the card (default: known from --dataset)')
    p.add_argument('--dataset-name', default=None,
                   help='data set name for the card (default: the known data set, the embedded set\'s name, else the '
                        'data folder\'s name)')
    p.add_argument('--base-model', default=None, help='Hub repo the run was fine-tuned from (default: from args)')
    p.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the huggingface_hub login)')
    p.add_argument('--private', action='store_true', help='create the repository as private')
    p.add_argument('--revision', default=None, help='branch to commit to (created if missing; default main)')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing directly')
    p.add_argument('--overwrite', action='store_true', help='replace the files of a repository that already has some')
    p.add_argument('--retries', type=_non_negative_int, default=4,
                   help='retries of each Hub call on network/server errors (exponential backoff)')
    p.set_defaults(func=_run_publish)


def _run_publish(args: argparse.Namespace) -> int:
    import json
    from .hub import PublishOptions, publish, read_label_names

    options = PublishOptions(
        checkpoint=args.checkpoint, use_ema=not args.no_ema, license=args.license,
        label_names=read_label_names(args.label_names) if args.label_names else None,
        dataset_name=args.dataset_name, dataset_id=args.dataset_id, base_model=args.base_model, token=args.token,
        private=args.private, revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr,
        overwrite=args.overwrite, retries=args.retries)
    result = publish(args.run_dir, args.repo_id, options, dry_run=args.dry_run, output_dir=args.output_dir)
    if result.folder is not None:
        print(result.folder)
        print(f"load it with: timm.create_model('{result.load_name}', pretrained=True)", file=sys.stderr)
    else:
        print(result.pr_url or result.commit_url)
        print(f"load it with: timm.create_model('{result.load_name}', pretrained=True)", file=sys.stderr)
        print('to register it as a pretrained tag, add this entry to timm_tract/published.json:\n'
              + json.dumps(result.manifest_entry), file=sys.stderr)
    return 0


def _add_train(sub) -> None:
    from .flags import HelpFormatter, build_train_parser
    p = sub.add_parser(
        'train', parents=[build_train_parser()], conflict_handler='resolve', formatter_class=HelpFormatter,
        help='train a timm model (a *_tract model or a tract-* optimizer) with timm train.py\'s flags and outputs',
        description='timm train.py for everyone without timm\'s repository: same flags, same output dir (args.yaml, '
                    'summary.csv, last.pth.tar, model_best.pth.tar, checkpoint-*.pth.tar). Multi-process: '
                    'torchrun --nproc_per_node=N -m timm_tract.cli train ...')
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import train

    run_args = _command_args(args)
    result = train(run_args)
    if int(os.environ.get('RANK', 0)) != 0:  # torchrun: one report, from rank 0
        return 0
    print(result.output_dir)
    if result.best_epoch >= 0:
        print(f"best {run_args.eval_metric} {result.best_metric:.4f} at epoch {result.best_epoch + 1} "
              f"(epochs counted from 1)", file=sys.stderr)
    return 0


def _add_compare(sub) -> None:
    from .compare.run import COMPARE_DESCRIPTION, build_compare_parser
    from .flags import HelpFormatter
    p = sub.add_parser(
        'compare', parents=[build_compare_parser(add_help=False)], conflict_handler='resolve',
        formatter_class=HelpFormatter, description=COMPARE_DESCRIPTION,
        help='baseline vs TrAct over epoch budgets and seeds: top-1, paired differences, speed-up, plot, report')
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from .compare.run import compare

    report = compare(_command_args(args))
    print(open(report['paths']['markdown']).read())
    return 0


def _env_flag(name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on (any case) is on; unset, empty, 0/false/no/off are off."""
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='timm-tract', description='TrAct first-layer training for timm models.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('--debug', action='store_true', default=_env_flag('TIMM_TRACT_DEBUG'),
                        help='show the traceback of user errors too (also TIMM_TRACT_DEBUG=1)')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_data(sub)
    _add_publish(sub)
    _add_train(sub)
    _add_compare(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Log records to whatever `sys.stderr` is when they are emitted (callers and tests may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it; the current sys.stderr is used instead
        pass


def _setup_logging() -> None:
    """The library logs (timm_tract.*, timm.*); the command line shows INFO on stderr (once, however often `main`
    runs in a process), without timm's per-epoch list of checkpoint files."""
    from timm.utils.log import FormatterNoInfo
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(FormatterNoInfo())
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger('timm.utils.checkpoint_saver').setLevel(logging.WARNING)


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import TimmTractError

    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except TimmTractError as e:
        if args.debug:
            import traceback
            traceback.print_exc()
        message = ' '.join(str(e).split())  # one line, whatever the message holds
        print(f'timm-tract {args.command}: error: {message}', file=sys.stderr)
        return 2
    except BrokenPipeError:  # `timm-tract data | true`: the reader went away before the output was written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        print(f'timm-tract {args.command}: error: stdout was closed before the output was written (broken pipe); '
              f'read the whole output, e.g. DIR="$(timm-tract {args.command} ...)".', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (errors.Terminated) where a command stops on it
        signum = getattr(e, 'signum', signal.SIGINT)
        how = 'interrupted' if signum == signal.SIGINT else f'stopped by {signal.Signals(signum).name}'
        print(f'timm-tract {args.command}: {how}', file=sys.stderr)
        return 128 + signum


if __name__ == '__main__':
    sys.exit(main())
