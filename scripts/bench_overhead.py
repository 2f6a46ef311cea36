#!/usr/bin/env python3
""" TrAct overhead: training-step time and peak memory of plain vs timm-tract vs the official torch-tract wrapper.

Step = forward + backward + SGD step at 224 px. Times are interleaved in one process (plain, ours, official, plain, ...)
and the median of >= 7 pairs is reported as ratios to plain. Peak memory of each variant is measured in a separate
process: on CUDA `torch.cuda.max_memory_allocated`, on CPU the peak RSS (ru_maxrss) over the RSS after building the
model, with glibc's mmap threshold fixed so freed tensors leave the RSS. Prints a Markdown table and writes JSON.

It also counts the aten ops of one TrAct backward (a `TorchDispatchMode` around `loss.backward()`, on CPU) for the
7×7/2 ResNet stem and a 16×16 patch embed at 224 px, B=8 and B=256, with the default CPU Gram budget and with a
budget large enough for one chunk (what accelerators get): the count of non-view ops is the number of kernels a GPU
would launch for it, and it must not grow with the batch.

It also times small-image settings (SMALL: the narrow ResNet-18 of `timm-tract compare` and ResNet-18 at 32/64 px)
with one torch thread, plain / timm-tract / official interleaved, medians of >= 9 pairs, in thread CPU time (less
sensitive than wall time to other processes on a shared machine), and the 7×7/2 stem's Gram alone on each path
(`unfold`, `shifted`, `spectral`) and the one the rule picks, at 32 px and 224 px, B=32.

    python scripts/bench_overhead.py                          # all five models, 7 pairs, small table, Gram, op counts
    python scripts/bench_overhead.py --models resnet18 --pairs 9 --json out.json
    python scripts/bench_overhead.py --models --no-small --no-gram --op-counts     # op counts only
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MODELS = {  # model: batch size
    'resnet18': 32,
    'resnet50': 16,
    'convnext_tiny': 16,
    'vit_small_patch16_224': 32,
    'deit_tiny_patch16_224': 64,
}
TARGETS = {'resnet18': 1.10, 'resnet50': 1.04, 'convnext_tiny': 1.01, 'vit_small_patch16_224': 1.01,
           'deit_tiny_patch16_224': 1.03}
VARIANTS = ('plain', 'timm_tract', 'official')
# small-image settings: (row name, timm model, model kwargs, batch, image size); 10 classes
SMALL = [
    ('resnet18 narrow (16/32/64/128), 32 px', 'resnet18', {'channels': (16, 32, 64, 128)}, 32, 32),
    ('resnet18, 32 px', 'resnet18', {}, 128, 32),
    ('resnet18, 64 px', 'resnet18', {}, 32, 64),
]
SMALL_TARGETS = (1.07, 1.02, 1.01)
GRAM_SETTINGS = ((32, 32), (32, 224))  # (batch, image size) of the 7×7/2 stem Gram timing


def make_variant(model: torch.nn.Module, variant: str, wrap_official=None) -> torch.nn.Module:
    """The model as `variant` trains it: 'plain' unchanged, 'timm_tract' via `apply_tract`, 'official' with its first
    layer wrapped in torch-tract's `TrAct` (then in `wrap_official`, if given). Shared with scripts/gpu_check.py."""
    import timm_tract
    if variant == 'timm_tract':
        timm_tract.apply_tract(model)
    elif variant == 'official':
        import torch_tract
        path, = timm_tract.find_first_layer(model)
        parent_name, _, child = path.rpartition('.')
        parent = model.get_submodule(parent_name)
        layer = torch_tract.TrAct(getattr(parent, child), l=0.1)
        setattr(parent, child, wrap_official(layer) if wrap_official else layer)
    return model


def _build(name: str, variant: str, device: str, **model_kwargs):
    import timm

    torch.manual_seed(0)
    model = make_variant(timm.create_model(name, **model_kwargs).to(device), variant)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, opt


def _batch(name: str, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(MODELS[name], 3, 224, 224, generator=gen).to(device)
    y = torch.randint(0, 1000, (MODELS[name],), generator=gen).to(device)
    return x, y


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def time_model(name: str, pairs: int, device: str) -> dict:
    """Median step time of each variant, interleaved, after one warm-up step each."""
    x, y = _batch(name, device)
    built = {v: _build(name, v, device) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        _step(*built[v], x, y)
    for _ in range(pairs):
        for v in VARIANTS:
            _sync(device)
            start = time.perf_counter()
            _step(*built[v], x, y)
            _sync(device)
            times[v].append(time.perf_counter() - start)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {'step_s': med, 'ratio': {v: med[v] / med['plain'] for v in VARIANTS}}


def _thread_time(fn) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def time_small(pairs: int) -> list:
    """Median thread CPU time of one CPU training step per variant for each SMALL setting, one torch thread,
    interleaved (plain, timm-tract, official, plain, ...), after two warm-up steps each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for (label, name, kwargs, batch, size), target in zip(SMALL, SMALL_TARGETS):
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
            built = {v: _build(name, v, 'cpu', num_classes=10, **kwargs) for v in VARIANTS}
            times = {v: [] for v in VARIANTS}
            for v in VARIANTS:
                for _ in range(2):
                    _step(*built[v], x, y)
            for _ in range(pairs):
                for v in VARIANTS:
                    times[v].append(_thread_time(lambda: _step(*built[v], x, y)))
            med = {v: statistics.median(t) for v, t in times.items()}
            rows.append({'setting': label, 'batch_size': batch, 'img_size': size, 'step_s': med, 'target': target,
                         'ratio': {v: med[v] / med['plain'] for v in VARIANTS}})
            print(f"| {label} | {batch} | {med['plain'] * 1e3:.1f} | {rows[-1]['ratio']['timm_tract']:.3f} "
                  f"(≤ {target:.2f}) | {rows[-1]['ratio']['official']:.3f} |", flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def time_gram(pairs: int) -> list:
    """Median thread CPU time of `patch_gram` of the 7×7/2 stem (C=3) on each path and on the chosen one, one torch
    thread, interleaved, for GRAM_SETTINGS."""
    from timm_tract import functional as TF

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    geom = TF.conv_geometry((64, 3, 7, 7), stride=2, padding=3)
    real_path = TF._gram_path
    try:
        for batch, size in GRAM_SETTINGS:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            chosen = real_path(geom, x.shape, size + 6, size + 6, x.device, TF._chunk_elements(x.device, x.dtype))
            times = {path: [] for path in ('unfold', 'shifted', 'spectral', 'chosen')}
            for _ in range(pairs + 1):
                for path in times:
                    TF._gram_path = real_path if path == 'chosen' else (lambda *a, p=path: p)
                    times[path].append(_thread_time(lambda: TF.patch_gram(x, geom)))
            med = {p: statistics.median(t[1:]) for p, t in times.items()}  # the first round warms the plans up
            rows.append({'batch_size': batch, 'img_size': size, 'chosen': chosen, 'gram_s': med})
            print(f"| {batch} | {size} | {med['unfold'] * 1e3:.2f} | {med['shifted'] * 1e3:.2f} | "
                  f"{med['spectral'] * 1e3:.2f} | {chosen} | {med['chosen'] / med['shifted']:.2f} |", flush=True)
    finally:
        TF._gram_path = real_path
        torch.set_num_threads(threads)
    return rows


def peak_memory(name: str, variant: str, device: str) -> int:
    """Peak bytes of two training steps in this process (call in a fresh process)."""
    x, y = _batch(name, device)
    model, opt = _build(name, variant, device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss()
    for _ in range(2):
        _step(model, opt, x, y)
    _sync(device)
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _memory_in_subprocess(name: str, variant: str, device: str) -> int:
    # fixed mmap threshold: glibc returns every large tensor to the OS when freed, so peak RSS tracks live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072')
    out = subprocess.run([sys.executable, __file__, '--_memory', name, variant, '--device', device],
                         check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


class _OpCounter(TorchDispatchMode):
    """Counts aten ops (all, and non-view: the ones that launch a kernel on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.total = self.non_view = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.non_view += not func.is_view
        return func(*args, **(kwargs or {}))


OP_COUNT_LAYERS = {  # name: (TrActConv2d args, kwargs)
    'resnet_stem_7x7s2': ((3, 64, 7), dict(stride=2, padding=3, bias=False)),
    'patch_embed_16x16': ((3, 384, 16), dict(stride=16)),
}


def count_backward_ops(layer_name: str, batch: int, size: int = 224, chunk_bytes: int = None,
                       as_accelerator: bool = True) -> dict:
    """aten ops of `loss.backward()` through one TrAct layer of OP_COUNT_LAYERS (CPU, float32, a standardized batch),
    in the steady state (after one warm-up backward); `chunk_bytes` sets the Gram chunk budget (None: the default);
    `as_accelerator`: with the accelerators' centering decision (always centered), else the CPU's own (a standardized
    batch is not centered; see `timm_tract.functional._far_from_zero_mean`).
    Returns {'total', 'non_view', 'plain_total', 'plain_non_view'}."""
    from timm_tract import TrActConv2d, functional as TF

    args, kwargs = OP_COUNT_LAYERS[layer_name]
    torch.manual_seed(0)
    layer = TrActConv2d(*args, **kwargs)
    x = torch.randn(batch, args[0], size, size)
    counts = {}
    TF.set_gram_chunk_bytes(chunk_bytes)
    decide = TF._far_from_zero_mean
    if as_accelerator:
        TF._far_from_zero_mean = lambda x, budget: True
    try:
        for key, module in (('', layer), ('plain_', torch.nn.Conv2d(*args, **kwargs))):
            module(x).sum().backward()  # warm-up: the first backward of a geometry builds its cached Gram plan
            loss = module(x).sum()
            with _OpCounter() as counter:
                loss.backward()
            counts[key + 'total'], counts[key + 'non_view'] = counter.total, counter.non_view
            del loss
    finally:
        TF.set_gram_chunk_bytes(None)
        TF._far_from_zero_mean = decide
    return counts


def op_count_table(batches=(8, 256), one_chunk_bytes: int = 2 << 30) -> dict:
    """Non-view op counts of one TrAct backward per layer, batch and Gram budget: 'cpu_default' (8 MiB), 'gpu_max' (the
    accelerator default on a GPU with >= 128 GiB, e.g. an H200: 256 MiB) and 'one_chunk' (2 GiB)."""
    from timm_tract import functional as TF

    budgets = (('cpu_default', None), ('gpu_max', TF._ACCEL_CHUNK_BOUNDS[1]), ('one_chunk', one_chunk_bytes))
    out = {}
    for layer_name in OP_COUNT_LAYERS:
        for budget_name, budget in budgets:
            for batch in batches:
                counts = count_backward_ops(layer_name, batch, chunk_bytes=budget)
                out.setdefault(layer_name, {}).setdefault(budget_name, {})[batch] = counts
                print(f'op count {layer_name} budget={budget_name} B={batch}: {counts["non_view"]} non-view '
                      f'({counts["total"]} total; plain conv {counts["plain_non_view"]})', flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='*', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--op-counts', action=argparse.BooleanOptionalAction, default=True,
                        help='count the aten ops of one TrAct backward at B=8 and B=256 (CPU)')
    parser.add_argument('--pairs', type=int, default=7, help='interleaved timing rounds (>= 7)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', default='bench_overhead.json', help='where to write the results')
    parser.add_argument('--no-memory', action='store_true', help='skip the per-process peak memory runs')
    parser.add_argument('--small', action=argparse.BooleanOptionalAction, default=True,
                        help='time the small-image settings (CPU, 1 thread)')
    parser.add_argument('--gram', action=argparse.BooleanOptionalAction, default=True,
                        help='time the 7×7/2 stem Gram alone on each path (CPU, 1 thread)')
    parser.add_argument('--small-pairs', type=int, default=9, help='interleaved rounds of the small table (>= 9)')
    parser.add_argument('--_memory', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        print(peak_memory(*args._memory, args.device))
        return 0
    if args.pairs < 7:
        parser.error('--pairs must be >= 7 (median of at least 7 interleaved pairs)')
    if args.small_pairs < 9:
        parser.error('--small-pairs must be >= 9 (median of at least 9 interleaved pairs)')

    results = {'device': args.device, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
               'machine': platform.processor() or platform.machine(), 'pairs': args.pairs, 'models': {}}
    if args.op_counts:
        results['op_counts'] = op_count_table()
    if args.small:
        print('| setting | batch | plain step (ms CPU) | timm-tract / plain (target) | official / plain |')
        results['small'] = time_small(args.small_pairs)
    if args.gram:
        print('| batch | px | unfold (ms) | shifted (ms) | spectral (ms) | chosen | chosen / shifted |')
        results['gram'] = time_gram(args.small_pairs)
    rows = []
    for name in args.models:
        res = time_model(name, args.pairs, args.device)
        if not args.no_memory:
            mem = {v: _memory_in_subprocess(name, v, args.device) for v in VARIANTS}
            res['peak_bytes'] = mem
            res['memory_ratio'] = {v: mem[v] / mem['plain'] for v in VARIANTS}
        res['batch_size'] = MODELS[name]
        res['target_ratio'] = TARGETS[name]
        results['models'][name] = res
        mem_cols = (f" | {res['memory_ratio']['timm_tract']:.3f} | {res['memory_ratio']['official']:.3f}"
                    if 'memory_ratio' in res else ' | - | -')
        rows.append(f"| {name} | {MODELS[name]} | {res['step_s']['plain']:.3f} | {res['ratio']['timm_tract']:.3f} "
                    f"(≤ {TARGETS[name]:.2f}) | {res['ratio']['official']:.3f}{mem_cols} |")
        print(rows[-1], flush=True)

    print(f"\nStep time (forward+backward+SGD) at 224 px on {args.device}, median of {args.pairs} interleaved pairs; "
          f"ratios to plain timm.")
    print('| model | batch | plain step (s) | timm-tract / plain (target) | official / plain | '
          'peak mem timm-tract / plain | peak mem official / plain |')
    print('|---|---|---|---|---|---|---|')
    print('\n'.join(rows))
    if args.small:
        print(f"\nSmall images (CPU, 1 torch thread, thread CPU time of forward+backward+SGD, 10 classes), median of "
              f"{args.small_pairs} interleaved rounds; ratios to plain timm.")
        print('| setting | batch | plain step (ms) | timm-tract / plain (target) | official / plain |')
        print('|---|---|---|---|---|')
        for r in results['small']:
            print(f"| {r['setting']} | {r['batch_size']} | {r['step_s']['plain'] * 1e3:.1f} | "
                  f"{r['ratio']['timm_tract']:.3f} (≤ {r['target']:.2f}) | {r['ratio']['official']:.3f} |")
    if args.gram:
        print(f"\nGram XᵀX of the 7×7/2 stem (C=3) alone, thread CPU time, median of {args.small_pairs} rounds:")
        print('| batch | px | unfold (ms) | shifted (ms) | spectral (ms) | chosen | chosen / shifted |')
        print('|---|---|---|---|---|---|---|')
        for r in results['gram']:
            g = r['gram_s']
            print(f"| {r['batch_size']} | {r['img_size']} | {g['unfold'] * 1e3:.2f} | {g['shifted'] * 1e3:.2f} | "
                  f"{g['spectral'] * 1e3:.2f} | {r['chosen']} | {g['chosen'] / g['shifted']:.2f} |")
    if args.op_counts:
        print('\nNon-view aten ops of one TrAct backward (CPU, 224 px; kernels an accelerator would launch):')
        print('| layer | Gram budget | B=8 | B=256 | plain conv |')
        print('|---|---|---|---|---|')
        for layer_name, per_budget in results['op_counts'].items():
            for budget_name, per_batch in per_budget.items():
                print(f"| {layer_name} | {budget_name} | {per_batch[8]['non_view']} | {per_batch[256]['non_view']} | "
                      f"{per_batch[8]['plain_non_view']} |")
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
    print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
