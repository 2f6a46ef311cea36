""" `timm-tract train` under torchrun: 2 CPU processes (gloo) against 1 process with the same global batches.

With `tract_sync_gram=True` every rank preconditions with the global-batch XᵀX, so the 2-process run equals the
1-process run. Without it each rank uses its own half-batch XᵀX (per-rank TrAct, like per-rank BatchNorm statistics):
after one step only the first layer differs from the 1-process run, everything else matches (DDP averages the other
gradients exactly). ConvNeXt has no BatchNorm, so nothing else differs between the two set-ups.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import load_state_dict
from timm.utils import random_seed

from timm_tract.flags import build_train_parser
from timm_tract.train import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _data(image_folder, root: Path, n_train: int, n_val: int = 4) -> Path:
    return image_folder(root, n_train, n_val, base=60, step=120, noise=50)


def _argv(data: Path, out: Path, name: str, batch: int, sync: bool):
    return [
        '--data-dir', str(data), '--model', 'convnext_atto', '--num-classes', '2', '--img-size', '32',
        '-b', str(batch), '-j', '0', '--epochs', '1', '--opt', 'tract-sgd', '--lr', '0.1', '--warmup-epochs', '0',
        '--no-aug', '--smoothing', '0', '--output', str(out), '--experiment', name, '--device', 'cpu', '--seed', '3',
        '--opt-kwargs', f'tract_sync_gram={sync}', '--log-interval', '1']


def _single(data, out, name, sync):
    torch.set_num_threads(1)
    return train(build_train_parser().parse_args(_argv(data, out, name, 8, sync)))


def _torchrun(data, out, name, sync):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'timm_tract.cli', 'train', *_argv(data, out, name, 4, sync)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == str(out / name)  # one report, from rank 0
    return out / name


def _weights(run_dir: Path):
    return load_state_dict(str(run_dir / 'last.pth.tar'))


def _summary(run_dir: Path):
    return (run_dir / 'summary.csv').read_text().splitlines()


def test_two_processes_with_sync_gram_match_one_process(tmp_path, image_folder):
    data = _data(image_folder, tmp_path / 'data', n_train=8)  # 16 images: 2 steps of global batch 8
    ref = Path(_single(data, tmp_path / 'out', 'single', sync=True).output_dir)
    ddp = _torchrun(data, tmp_path / 'out', 'ddp', sync=True)
    ref_sd, ddp_sd = _weights(ref), _weights(ddp)
    assert ref_sd.keys() == ddp_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(ddp_sd[k], ref_sd[k], rtol=1e-4, atol=1e-5, msg=k)
    ref_row, ddp_row = _summary(ref)[1].split(','), _summary(ddp)[1].split(',')
    assert float(ddp_row[1]) == pytest.approx(float(ref_row[1]), rel=1e-4)  # train_loss over the same global batches
    assert [float(v) for v in ddp_row[2:5]] == pytest.approx([float(v) for v in ref_row[2:5]], rel=1e-4)  # eval


def test_two_processes_without_sync_gram_differ_in_first_layer_only(tmp_path, image_folder):
    data = _data(image_folder, tmp_path / 'data', n_train=4)  # 8 images: one step of global batch 8
    ref = Path(_single(data, tmp_path / 'out', 'single', sync=False).output_dir)
    ddp = _torchrun(data, tmp_path / 'out', 'ddp', sync=False)
    ref_sd, ddp_sd = _weights(ref), _weights(ddp)
    for k in ref_sd:
        if k == 'stem.0.weight':
            continue
        torch.testing.assert_close(ddp_sd[k], ref_sd[k], rtol=1e-4, atol=1e-5, msg=k)
    random_seed(3, 0)  # the run's initial weights (train() seeds with --seed, rank 0's weights are broadcast)
    init = timm.create_model('convnext_atto', num_classes=2).state_dict()['stem.0.weight']
    ref_update = ref_sd['stem.0.weight'] - init
    ddp_update = ddp_sd['stem.0.weight'] - init
    rel = ((ddp_update - ref_update).norm() / ref_update.norm()).item()
    cos = torch.nn.functional.cosine_similarity(ddp_update.flatten(), ref_update.flatten(), dim=0).item()
    print(f'first-layer update, per-rank vs global XᵀX: relative difference {rel:.3f}, cosine {cos:.3f}')
    assert 1e-4 < rel < 0.5 and cos > 0.9  # a different, but closely aligned, first-layer update
