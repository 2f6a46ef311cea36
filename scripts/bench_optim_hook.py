""" Cost of the registration hooks behind the tract-* optimizers for a process that never uses one.

Times `timm.create_model` (resnet50, vit_base_patch16_224) with the hooks installed (as after `import timm_tract`)
and removed, interleaved, and prints the median of each (noisy on a shared machine), plus the time of the hook calls
alone: the registrations of one model creation recorded and replayed through the hooks. Also times timm's
`param_groups_layer_decay` (what `create_optimizer_v2(..., layer_decay=...)` calls) through the recorder that
`import timm_tract` wraps it in, against timm's own function, interleaved.

    PYTHONPATH=. python scripts/bench_optim_hook.py [--repeats 7]
"""
import argparse
import statistics
import time

import timm
import torch

import timm_tract.optim as tract_optim
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)


def _time_create(name: str) -> float:
    t0 = time.perf_counter()
    timm.create_model(name, pretrained=False, device='meta')
    return time.perf_counter() - t0


def _set_hooks(on: bool) -> None:
    for h in tract_optim._hook_handles:
        h.remove()
    tract_optim._hook_handles = (
        register_module_parameter_registration_hook(tract_optim._on_parameter_registration),
        register_module_module_registration_hook(tract_optim._on_module_registration),
    ) if on else ()


def _replay_cost(name: str, repeats: int) -> tuple:
    """(seconds spent in the hooks for one create_model, number of hook calls)."""
    events = []
    handles = (
        register_module_parameter_registration_hook(lambda m, n, p: events.append((0, m, n, p))),
        register_module_module_registration_hook(lambda m, n, c: events.append((1, m, n, c))),
    )
    timm.create_model(name, device='meta')
    for h in handles:
        h.remove()
    hooks = (tract_optim._on_parameter_registration, tract_optim._on_module_registration)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        for kind, m, n, obj in events:
            hooks[kind](m, n, obj)
        best = min(best, time.perf_counter() - t0)
    return best, len(events)


def _layer_decay_cost(name: str, repeats: int) -> tuple:
    """(median seconds of timm's param_groups_layer_decay, median through timm-tract's recorder) on one model."""
    import timm.optim._optim_factory as factory
    recorded = factory.param_groups_layer_decay
    plain = recorded.__wrapped__
    model = timm.create_model(name, device='meta')
    times = {plain: [], recorded: []}
    for _ in range(repeats):
        for fn in times:
            t0 = time.perf_counter()
            fn(model, layer_decay=0.75)
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[plain]), statistics.median(times[recorded])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--models', nargs='+', default=['resnet50', 'vit_base_patch16_224'])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        _time_create(name)  # warm-up (imports, caches)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for on in (False, True):
                _set_hooks(on)
                times[on].append(_time_create(name))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        n_params = sum(1 for _ in timm.create_model(name, device='meta').parameters())
        hook_s, calls = _replay_cost(name, args.repeats)
        print(f'{name:24s} create_model (meta) without hooks {off * 1e3:7.2f} ms, with hooks {on * 1e3:7.2f} ms '
              f'({(on - off) / off * 100:+.1f}%, {n_params} params); hook calls alone: {calls} calls, '
              f'{hook_s * 1e3:.3f} ms = {hook_s / off * 100:.2f}% of create_model')
        ld_plain, ld_recorded = _layer_decay_cost(name, args.repeats)
        print(f'{name:24s} param_groups_layer_decay {ld_plain * 1e3:7.2f} ms, through the recorder '
              f'{ld_recorded * 1e3:7.2f} ms ({(ld_recorded - ld_plain) / ld_plain * 100:+.1f}%)')
    _set_hooks(True)


if __name__ == '__main__':
    main()
