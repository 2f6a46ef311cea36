""" Import cost of the `*_tract` model registry: `import timm_tract` over `import timm`, in fresh processes.

    python scripts/bench_import_models.py [--repeats 5]

Each repeat runs one fresh interpreter that times `import timm`, then `import timm_tract` (the whole package), and
a second one under `python -X importtime` that reads the cumulative time of `timm_tract.models` (the registration of
the hundreds of twins, its imports included). Prints medians in milliseconds. Goal: well under 1 s over `import timm`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

_PACKAGE = r'''
import json, time
t0 = time.perf_counter(); import timm; t1 = time.perf_counter(); import timm_tract; t2 = time.perf_counter()
print(json.dumps({'timm': t1 - t0, 'timm_tract_over_timm': t2 - t1,
                  'twins': len(timm.list_models('*_tract'))}))
'''



def _run(code: str, root: str, importtime: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable] + (['-X', 'importtime'] if importtime else []) + ['-c', code]
    out = subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if importtime:  # lines 'import time: <self us> | <cumulative us> | <indented module name>'
        cumulative = [int(line.split('|')[1]) for line in out.stderr.splitlines()
                      if line.startswith('import time:') and line.split('|')[2].strip() == 'timm_tract.models']
        result['registry_only'] = cumulative[0] / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = [_run(_PACKAGE, root) for _ in range(args.repeats)]
    registry = [_run(_PACKAGE, root, importtime=True) for _ in range(args.repeats)]
    ms = lambda rows, key: 1000 * statistics.median(r[key] for r in rows)  # noqa: E731
    print(f'twins registered:                    {package[0]["twins"]}')
    print(f'import timm:                         {ms(package, "timm"):8.1f} ms (median of {args.repeats})')
    print(f'import timm_tract over import timm:  {ms(package, "timm_tract_over_timm"):8.1f} ms')
    print(f'  of which timm_tract.models alone:  {ms(registry, "registry_only"):8.1f} ms')


if __name__ == '__main__':
    main()
