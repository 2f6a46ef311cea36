""" tract-* through timm's real train.py with the newer training stack: distillation with a local teacher folder
(--kd-model-name local-dir:...), layer-wise lr decay (--layer-decay, a stem frozen by --layer-decay-no-opt-scale),
the Muon family (--opt tract-adamuon), scheduled image / batch sizes (--train-img-sizes, --train-batch-sizes).
train.py is not on PyPI: set TIMM_TRAIN_PY to a timm checkout's train.py. """
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm

from _stack_helpers import stem_freezing_scale

TRAIN_PY = os.environ.get('TIMM_TRAIN_PY')  # path to train.py of a timm repository clone (not on PyPI, so not in CI)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TRAIN_PY, reason='set TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py to run '
                                            'timm\'s train.py'),
]

NUM_CLASSES = 2


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_folder) -> Path:
    return image_folder(tmp_path_factory.mktemp('data'), 6, 2)  # 12 train images = 3 batches of 4, 4 val images


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory) -> Path:
    """A convnext_atto teacher (320 features, resnet10t has 512: feature distillation needs a projection), saved
    with timm's save_for_hf, as `--kd-model-name local-dir:<folder>` reads it."""
    from timm.models import save_for_hf
    folder = tmp_path_factory.mktemp('teacher')
    save_for_hf(timm.create_model('convnext_atto', pretrained=False, num_classes=NUM_CLASSES), str(folder))
    return folder


def _run_train_py(data_dir: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """timm's train.py with `--device-modules timm_tract` on the tiny ImageFolder: 1 epoch of 3 batches, CPU."""
    cmd = [sys.executable, TRAIN_PY, '--device-modules', 'timm_tract', '--data-dir', str(data_dir), '--device', 'cpu',
           '--num-classes', str(NUM_CLASSES), '--img-size', '16', '-b', '4', '-j', '0', '--epochs', '1',
           '--warmup-epochs', '0', '--no-aug', '--output', str(out), '--experiment', 'e', *options]
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1]), 'OMP_NUM_THREADS': '1'}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(TRAIN_PY), timeout=600)


def _assert_trained(proc: subprocess.CompletedProcess, out: Path, log_line: str) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log_line in proc.stderr + proc.stdout
    assert (out / 'e' / 'last.pth.tar').exists() and (out / 'e' / 'summary.csv').exists()


@pytest.mark.parametrize('distill_type', ['logit', 'feature'])
def test_distillation_with_a_local_teacher_trains_the_student_stem(data_dir, teacher_dir, tmp_path, distill_type):
    proc = _run_train_py(data_dir, tmp_path, '--model', 'resnet10t', '--opt', 'tract-sgd', '--lr', '0.01',
                         '--img-size', '32',  # convnext_atto reduces by 32
                         '--kd-model-name', f'local-dir:{teacher_dir}', '--kd-distill-type', distill_type)
    _assert_trained(proc, tmp_path, 'tract-sgd: TrAct on ResNet first layer')  # the student, not the ConvNeXt teacher
    if distill_type == 'feature':
        assert 'Creating projection layer: 512 -> 320' in proc.stderr + proc.stdout


def test_layer_decay(data_dir, tmp_path):
    proc = _run_train_py(data_dir, tmp_path, '--model', 'resnet10t', '--opt', 'tract-adamw', '--lr', '0.001',
                         '--layer-decay', '0.5')
    _assert_trained(proc, tmp_path, 'tract-adamw: TrAct on ResNet first layer')


def test_layer_decay_freezing_the_stem_stops_with_the_reason(data_dir, tmp_path):
    no_opt = stem_freezing_scale(timm.create_model('resnet10t', num_classes=NUM_CLASSES), layer_decay=0.5)
    proc = _run_train_py(data_dir, tmp_path, '--model', 'resnet10t', '--opt', 'tract-adamw', '--lr', '0.001',
                         '--layer-decay', '0.5', '--layer-decay-no-opt-scale', str(no_opt))
    assert proc.returncode != 0
    assert 'tract-adamw: layer-wise lr decay froze the first layer of ResNet' in proc.stderr
    assert not (tmp_path / 'e' / 'last.pth.tar').exists()


def test_tract_adamuon(data_dir, tmp_path):
    proc = _run_train_py(data_dir, tmp_path, '--model', 'resnet10t', '--opt', 'tract-adamuon', '--lr', '0.001')
    _assert_trained(proc, tmp_path, 'tract-adamuon: TrAct on ResNet first layer')
    assert 'weight in a use_fallback group: AdamW-style update' in proc.stderr + proc.stdout


def test_scheduled_image_and_batch_sizes(data_dir, tmp_path):
    proc = _run_train_py(data_dir, tmp_path, '--model', 'resnet10t', '--opt', 'tract-sgd', '--lr', '0.01',
                         '--train-img-sizes', '16', '24', '--train-batch-sizes', '4', '2')
    _assert_trained(proc, tmp_path, 'tract-sgd: TrAct on ResNet first layer')
    assert 'Using scheduled training resolutions [16, 24]' in proc.stderr + proc.stdout
