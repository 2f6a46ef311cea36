""" Shared fixtures: one torch thread, a tiny ImageFolder writer, the loopback Hub (tests/_fake_hub.py). """
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _fake_hub import FakeHub
from _tract_runs import make_run


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_image_folder(root: Path, n_train: int, n_val: int, classes: int = 2, base: int = 40, step: int = 80,
                        noise: int = 40) -> Path:
    """`train/class<c>/<i>.png` and `validation/...`: 16×16 RGB, class c around gray level base + step·c ± noise."""
    rng = np.random.default_rng(0)
    for split, count in (('train', n_train), ('validation', n_val)):
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(count):
                img = np.full((16, 16, 3), base + step * c, np.int64) + rng.integers(-noise, noise, (16, 16, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f'{i}.png')
    return root


@pytest.fixture(scope='session')
def image_folder():
    """The writer of tiny ImageFolders: `image_folder(root, n_train, n_val, classes=2, ...)` returns `root`."""
    return _write_image_folder


@pytest.fixture(scope='module')
def hub():
    """A Hub-compatible server on 127.0.0.1 for the real huggingface_hub client (see tests/_fake_hub.py)."""
    with FakeHub() as server:
        yield server


@pytest.fixture
def no_xet(monkeypatch):
    """The fake Hub speaks legacy LFS, not Xet; huggingface_hub read the env at import, so patch its constants."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True)
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_TELEMETRY', True)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory) -> Path:
    """A finished tract-sgd run (train.py layout), one per test module; damage only copies of it (`copy_run`)."""
    return make_run(tmp_path_factory.mktemp('runs') / 'tract-sgd')
