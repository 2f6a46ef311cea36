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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-tract', description='TrAct first-layer training for timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_demo(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
