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
