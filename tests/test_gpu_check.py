""" scripts/gpu_check.py end to end in its CPU smoke mode (the full run needs a GPU: see the README). """
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_run_on_cpu(tmp_path):
    out_json, out_md = tmp_path / 'bench_gpu.json', tmp_path / 'bench_gpu.md'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--smoke', '--device', 'cpu', '--models', 'resnet18',
         '--json', str(out_json), '--md', str(out_md)],
        capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'stage 1: CUDA tests' in proc.stdout and 'stage 2+3' in proc.stdout  # progress is printed
    data = json.loads(out_json.read_text())
    assert data['complete'] and data['smoke'] and data['steps'] == 3
    assert data['tests']['returncode'] == 0 and data['tests']['passed'] == 0 and data['tests']['skipped'] >= 1
    row = data['models']['resnet18']
    assert set(row['ratio']) == {'plain', 'timm_tract', 'official'} and row['ratio']['plain'] == 1.0
    assert '| resnet18 | 2 | 32 |' in out_md.read_text()


def test_full_run_includes_the_small_image_settings():
    """The first GPU run also measures the small-image rows of scripts/bench_overhead.py."""
    import importlib.util
    sys.path.insert(0, str(REPO / 'scripts'))
    try:
        spec = importlib.util.spec_from_file_location('gpu_check', REPO / 'scripts' / 'gpu_check.py')
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
        bench = sys.modules.get('bench_overhead') or __import__('bench_overhead')
        rows = {(key, batch, size) for key, batch, size in gpu_check.FULL}
        assert {('resnet18_narrow', 32, 32), ('resnet18_32px_b128', 128, 32), ('resnet18_64px_b32', 32, 64)} <= rows
        assert [(b, s) for *_, b, s in bench.SMALL] == [(32, 32), (128, 32), (32, 64)]
        model, _ = gpu_check._build('resnet18_narrow', 'timm_tract', 'cpu', 32)
        assert model.layer1[0].conv1.out_channels == 16 and type(model.conv1).__name__ == 'TrActConv2d'
    finally:
        sys.path.remove(str(REPO / 'scripts'))
