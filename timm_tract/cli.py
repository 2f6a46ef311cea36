""" `timm-tract` command line: thin argument parsing over the package's functions. """
import argparse
import sys
from typing import List, Optional


def _add_demo(sub) -> None:
    p = sub.add_parser('demo', help='fit a timm model to a fixed batch with and without TrAct, print the losses')
    p.add_argument('--model', default='resnet18', help='timm architecture (default: resnet18)')
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--tract-lambda', type=float, default=0.1)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch
    import timm
    from .layers import apply_tract

    torch.manual_seed(0)
    x = torch.randn(16, 3, 64, 64) * torch.rand(16, 1, 1, 1) * 3 + torch.randn(16, 1, 1, 1)  # varied contrast/brightness
    y = torch.randint(0, 10, (16,))
    losses = {}
    for name in ('plain', 'tract'):
        torch.manual_seed(1)
        model = timm.create_model(args.model, num_classes=10)
        if name == 'tract':
            apply_tract(model, args.tract_lambda)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(args.steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses[name] = loss.item()
        print(f'{args.model} {name:5s}: loss after {args.steps} steps {losses[name]:.4f}')
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser(
        'data', help='print where the embedded default data set is (an ImageFolder; built on first use, ~10 s)',
        description='Print the path of the embedded data set (real digit scans on real photographs, 32x32 RGB, '
                    '10 classes, train/ and validation/ ImageFolder), building it first if needed. '
                    'Location: $TIMM_TRACT_DATA, else ~/.cache/timm-tract/. Use it as train.py --data-dir.')
    p.add_argument('--root', default=None, help='data set directory (default: $TIMM_TRACT_DATA or the user cache)')
    p.add_argument('--rebuild', action='store_true', help='render the data set again even if it exists')
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from .data import build_data, default_data_dir, ensure_data, read_manifest

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-tract', description='TrAct first-layer training for timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_demo(sub)
    _add_data(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
