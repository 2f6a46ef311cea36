#!/usr/bin/env python3
""" Everything of timm-tract that needs a GPU, in one command: the CUDA tests, then step time and peak memory of
plain timm vs timm-tract vs the official torch-tract wrapper at training scale. Writes JSON and a Markdown table.

1. The `cuda`-marked tests (tests/test_gpu.py, via pytest): no host-device sync in a step, CUDA-graph capture
   (`torch.compile(mode='reduce-overhead')`), inductor, fp16 + GradScaler, bf16 + channels_last against float64,
   parity with the official package on CUDA, a 1-process NCCL `sync_gram` step.
2. Step time (forward + backward + SGD step) in bf16 autocast with channels_last: plain, timm-tract (`apply_tract`)
   and official (`torch_tract.TrAct` around the same layer), interleaved step by step, median of >= 20 steps after
   warm-up; ratios to plain.
3. Peak memory of one step of each variant (`max_memory_allocated` over what was allocated before the step); the
   extra peak of TrAct as a share of the plain step's peak.

Budget: at most 8 minutes on one H200-class GPU (--budget-s, default 450 s). Progress is printed as it goes and the
JSON is rewritten after every stage and every model, so a run cut short (timeout, Ctrl-C, SIGTERM) leaves its
partial results.

    python scripts/gpu_check.py                                   # the full check (CUDA)
    python scripts/gpu_check.py --smoke --device cpu --json /tmp/g.json --md /tmp/g.md   # tiny run of every stage
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ('plain', 'timm_tract', 'official')

# (timm model, batch size, image size): the rows
FULL = [
    ('resnet50', 256, 224),
    ('convnext_tiny', 256, 224),
    ('vit_base_patch16_224', 256, 224),
    ('deit_small_patch16_224', 512, 224),
    ('resnet18', 1024, 32),  # CIFAR-style
    # the small-image settings of scripts/bench_overhead.py (row keys of ALIASES: timm model + kwargs; 1000 classes)
    ('resnet18_narrow', 32, 32),
    ('resnet18_32px_b128', 128, 32),
    ('resnet18_64px_b32', 32, 64),
]
ALIASES = {  # row key: (timm model, create_model kwargs)
    'resnet18_narrow': ('resnet18', {'channels': (16, 32, 64, 128)}),
    'resnet18_32px_b128': ('resnet18', {}),
    'resnet18_64px_b32': ('resnet18', {}),
}
SMOKE = [
    ('resnet18', 2, 32),
    ('deit_tiny_patch16_224', 2, 32),
]
TARGETS = {'resnet50': 1.03, 'convnext_tiny': 1.01, 'vit_base_patch16_224': 1.01, 'deit_small_patch16_224': 1.01}
MEMORY_TARGET = 0.01  # extra peak memory of TrAct: at most 1 % of the plain step's peak


class _Report:
    """Results so far; written to disk after every piece of work and on SIGTERM/SIGINT."""

    def __init__(self, json_path: Path, md_path: Path, meta: dict):
        self.json_path, self.md_path = json_path, md_path
        self.data = dict(meta, complete=False, tests=None, models={})

    def write(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix('.json.tmp')
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.json_path)
        self.md_path.write_text(markdown(self.data))


def _log(msg: str) -> None:
    print(f'[gpu_check {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run_tests(timeout_s: float) -> dict:
    """pytest -m cuda tests/test_gpu.py; returns counts and the failing test ids."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / 'junit.xml'
        cmd = [sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', 'tests/test_gpu.py', '-p', 'no:cacheprovider',
               f'--junitxml={junit}']
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, timeout_s))
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or ''), 'timeout'
        result = {'returncode': rc, 'seconds': round(time.perf_counter() - start, 1), 'tail': out[-3000:]}
        if junit.exists():
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == 'testsuite' else suite[0]
            cases = suite.findall('testcase')
            failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
                      if c.find('failure') is not None or c.find('error') is not None]
            skipped = sum(c.find('skipped') is not None for c in cases)
            result.update(total=len(cases), failed=failed, skipped=skipped,
                          passed=len(cases) - len(failed) - skipped)
    return result


class _Float32Layer(torch.nn.Module):
    """Runs a wrapped layer in float32 with autocast off (the official wrapper's backward fails under bf16 autocast:
    its bf16 output gradient meets the float32 unfolded input)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def _build(name: str, variant: str, device: str, img_size: int, official_fp32: bool = False):
    import timm
    from bench_overhead import make_variant  # scripts/ is on sys.path when this script runs

    torch.manual_seed(0)
    name, kwargs = ALIASES.get(name, (name, {}))
    kwargs = dict(kwargs, **({'img_size': img_size} if img_size != 224 and ('vit' in name or 'deit' in name) else {}))
    model = make_variant(timm.create_model(name, **kwargs), variant, _Float32Layer if official_fp32 else None)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    return model, opt


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _step(model, opt, x, y, device: str) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.split(':')[0], dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _timed_step(model, opt, x, y, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    _step(model, opt, x, y, device)
    _sync(device)
    return time.perf_counter() - start


def _peak_step(model, opt, x, y, device: str):
    """Peak bytes allocated during one step above what was allocated before it (CUDA; None elsewhere)."""
    if not device.startswith('cuda'):
        _step(model, opt, x, y, device)
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(model, opt, x, y, device)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_model(name: str, batch: int, img_size: int, device: str, steps: int, warmup: int) -> dict:
    """Interleaved step times and per-step peak memory of the three variants of one model."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    res = {'batch_size': batch, 'img_size': img_size, 'errors': {}, 'notes': {}}
    built = {}
    for v in VARIANTS:
        for official_fp32 in ((False, True) if v == 'official' else (False,)):
            try:
                built[v] = _build(name, v, device, img_size, official_fp32)
                for _ in range(warmup):
                    _step(*built[v], x, y, device)
                _sync(device)
                if official_fp32:
                    res['notes'][v] = ('its layer runs in float32 with autocast off (under bf16 autocast it fails: '
                                       f"{res['errors'].pop(v)})")
                break
            except Exception as e:  # an OOM or an unsupported dtype is reported, not fatal
                res['errors'][v] = f'{type(e).__name__}: {str(e)[:300]}'
                built.pop(v, None)
                if device.startswith('cuda'):
                    torch.cuda.empty_cache()
    if 'plain' not in built:
        return res
    times = {v: [] for v in built}
    for _ in range(steps):
        for v in list(built):
            try:
                times[v].append(_timed_step(*built[v], x, y, device))
            except Exception as e:
                res['errors'][v] = f'{type(e).__name__}: {str(e)[:300]}'
                del built[v], times[v]
    med = {v: statistics.median(t) for v, t in times.items() if t}
    res['steps'] = steps
    res['step_s'] = med
    res['ratio'] = {v: med[v] / med['plain'] for v in med}
    peaks = {}
    for v in built:
        try:
            peaks[v] = _peak_step(*built[v], x, y, device)
        except Exception as e:
            res['errors'][v] = f'{type(e).__name__}: {str(e)[:300]}'
    if peaks.get('plain'):
        res['peak_bytes'] = peaks
        res['extra_peak_share'] = {v: (p - peaks['plain']) / peaks['plain'] for v, p in peaks.items()}
    del built
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    return res


def markdown(data: dict) -> str:
    lines = [f"Step (forward+backward+SGD) in bf16 autocast, channels_last, on {data['device_name']} "
             f"(torch {data['torch']}); median of {data['steps']} interleaved steps after {data['warmup']} warm-up "
             f"steps; ratios to plain timm. Extra peak: one step's `max_memory_allocated` above plain's, as a share "
             f"of plain's peak.{'' if data.get('complete') else ' PARTIAL RESULTS (run cut short).'}", '',
             '| model | batch | px | plain step (ms) | timm-tract / plain (target) | official / plain | '
             'extra peak timm-tract | extra peak official |', '|---|---|---|---|---|---|---|---|']
    for name, r in data['models'].items():
        if 'ratio' not in r:
            lines.append(f"| {name} | {r.get('batch_size', '-')} | {r.get('img_size', '-')} | "
                         f"{r.get('skipped') or r.get('errors')} | | | | |")
            continue

        def ratio(v):
            return f"{r['ratio'][v]:.3f}" if v in r['ratio'] else 'error'

        def extra(v):
            share = r.get('extra_peak_share', {}).get(v)
            return '-' if share is None else f"{share * 100:+.2f} %"
        target = f" (≤ {TARGETS[name]:.2f})" if name in TARGETS else ''
        lines.append(f"| {name} | {r['batch_size']} | {r['img_size']} | {r['step_s']['plain'] * 1000:.1f} | "
                     f"{ratio('timm_tract')}{target} | {ratio('official')} | {extra('timm_tract')} | "
                     f"{extra('official')} |")
    notes = sorted({f'{v}: {n}' for r in data['models'].values() for v, n in r.get('notes', {}).items()})
    if notes:
        lines += [''] + [f'Note, {n}' for n in notes]
    tests = data.get('tests')
    if tests:
        lines += ['', f"CUDA tests (`pytest -m cuda tests/test_gpu.py`): {tests.get('passed', '?')} passed, "
                      f"{len(tests.get('failed', []))} failed, {tests.get('skipped', '?')} skipped "
                      f"({tests['seconds']} s)" + (f"; failed: {', '.join(tests['failed'])}" if tests.get('failed')
                                                   else '')]
    return '\n'.join(lines) + '\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--smoke', action='store_true', help='tiny models, batches and step counts (any device)')
    parser.add_argument('--steps', type=int, default=None, help='timed interleaved steps (>= 20; smoke: 3)')
    parser.add_argument('--warmup', type=int, default=None, help='warm-up steps per variant (default 3; smoke: 1)')
    parser.add_argument('--models', nargs='*', default=None, help='subset of the model names')
    parser.add_argument('--skip-tests', action='store_true', help='skip the pytest stage')
    parser.add_argument('--budget-s', type=float, default=450.0, help='stop starting new work after this many seconds')
    parser.add_argument('--json', default=str(REPO / 'docs' / 'bench_gpu.json'))
    parser.add_argument('--md', default=str(REPO / 'docs' / 'bench_gpu.md'))
    args = parser.parse_args()
    steps = args.steps or (3 if args.smoke else 20)
    warmup = args.warmup or (1 if args.smoke else 3)
    if not args.smoke and steps < 20:
        parser.error('--steps must be >= 20 (median of at least 20 interleaved steps); use --smoke for a quick run')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('CUDA is not available; run with --smoke --device cpu for a CPU smoke run')
    specs = SMOKE if args.smoke else FULL
    if args.models:
        specs = [s for s in specs if s[0] in args.models]
    start = time.perf_counter()

    import timm
    import timm_tract
    from timm_tract import functional as TF
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else platform.processor()
    report = _Report(Path(args.json), Path(args.md), dict(
        device=args.device, device_name=device_name or platform.machine(), torch=torch.__version__,
        timm=timm.__version__, timm_tract=timm_tract.__version__, smoke=args.smoke, steps=steps, warmup=warmup,
        gram_chunk_bytes=TF.gram_chunk_bytes(args.device), started=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())))

    def on_signal(signum, frame):
        report.data['interrupted'] = signal.Signals(signum).name
        report.write()
        _log(f'{signal.Signals(signum).name}: partial results written to {args.json}')
        sys.exit(130)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    report.write()

    if not args.skip_tests:
        _log('stage 1: CUDA tests (pytest -m cuda tests/test_gpu.py)')
        report.data['tests'] = run_tests(timeout_s=min(240.0, args.budget_s / 2))
        t = report.data['tests']
        _log(f"tests: {t.get('passed')} passed, {len(t.get('failed', []))} failed, {t.get('skipped')} skipped "
             f"in {t['seconds']} s (rc {t['returncode']})")
        report.write()

    _log(f'stage 2+3: step time and peak memory, {len(specs)} models, {steps} steps each')
    for name, batch, img_size in specs:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report.data['models'][name] = {'batch_size': batch, 'img_size': img_size,
                                           'skipped': f'time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)'}
            _log(f'{name}: skipped, time budget spent')
            report.write()
            continue
        _log(f'{name} B={batch} {img_size}px ...')
        t0 = time.perf_counter()
        res = bench_model(name, batch, img_size, args.device, steps, warmup)
        res['seconds'] = round(time.perf_counter() - t0, 1)
        report.data['models'][name] = res
        report.write()
        ratios = ', '.join(f'{v} {r:.3f}' for v, r in res.get('ratio', {}).items())
        _log(f"{name}: {ratios or 'no timing'}; extra peak {res.get('extra_peak_share')}; errors {res['errors'] or '-'}"
             f"; notes {res['notes'] or '-'} ({res['seconds']} s)")
    report.data['complete'] = True
    report.data['seconds'] = round(time.perf_counter() - start, 1)
    report.write()
    print()
    print(Path(args.md).read_text())
    _log(f'wrote {args.json} and {args.md} in {report.data["seconds"]} s')
    tests = report.data['tests']
    failed = tests and (tests.get('failed') or tests['returncode'] not in (0, 5))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
