""" Shared by the training tests: a one-thread fixture and a tiny ImageFolder writer. """
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared CI machine (autouse where imported)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_image_folder(root: Path, n_train: int, n_val: int, classes: int = 2, base: int = 40, step: int = 80,
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
