""" The embedded default data set: built from shipped pixels, balanced, seeded, readable by timm, never clobbering. """
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_tract.data import DATASET_NAME, build_data, default_data_dir, ensure_data, read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp('cache') / DATASET_NAME
    manifest = build_data(root)
    return root, manifest


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*.png'))}


def test_layout_counts_and_split(built):
    root, manifest = built
    assert read_manifest(root) == manifest
    assert manifest['num_classes'] == 10 and manifest['img_size'] == 32
    names = {}
    for split in ('train', 'validation'):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        for cls in classes:
            files = sorted((root / split / cls).glob('*.png'))
            assert len(files) == manifest['counts'][split][cls]
            names[split] = names.get(split, set()) | {f.name for f in files}
    assert len(names['train']) + len(names['validation']) == 1797  # every sklearn digit scan exactly once
    assert not names['train'] & names['validation']  # no scan in both splits
    train, val = manifest['counts']['train'], manifest['counts']['validation']
    assert all(139 <= n <= 146 for n in train.values()) and all(35 <= n <= 37 for n in val.values())


def test_images_are_rgb_32_with_varied_exposure(built):
    root, manifest = built
    files = sorted((root / 'train').rglob('*.png'))
    imgs = np.stack([np.asarray(Image.open(f)) for f in files[::5]]).astype(np.float64) / 255.
    assert imgs.shape[1:] == (32, 32, 3)
    contrast = imgs.std(axis=(1, 2, 3))
    brightness = imgs.mean(axis=(1, 2, 3))
    # real-photo-like exposure spread: the 90th percentile contrast is several times the 10th, brightness spans range
    assert np.percentile(contrast, 90) > 3 * np.percentile(contrast, 10)
    assert np.percentile(brightness, 10) < 0.3 and np.percentile(brightness, 90) > 0.65
    assert not np.allclose(imgs[..., 0], imgs[..., 1])  # colour, not grey replicated
    # manifest statistics describe the train split (checked on the subsample, so loosely)
    np.testing.assert_allclose(imgs.mean(axis=(0, 1, 2)), manifest['mean'], atol=0.03)


def test_timm_reads_it_as_imagefolder(built):
    from timm.data import create_dataset

    root, manifest = built
    for split in ('train', 'validation'):
        ds = create_dataset('', root=str(root), split=split)
        assert len(ds) == sum(manifest['counts'][split].values())
        img, target = ds[0]
        assert img.size == (32, 32) and 0 <= target < 10
    assert ds.reader.class_to_idx == {str(d): d for d in range(10)}


def test_rebuild_is_byte_identical_and_needs_overwrite(built):
    root, _ = built
    before = _digests(root)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        build_data(root)
    build_data(root, overwrite=True)
    assert _digests(root) == before
    assert not [p for p in root.parent.iterdir() if p.name.startswith('.')]  # temporary build dir cleaned up


def test_refuses_user_directory(tmp_path):
    user = tmp_path / 'mine'
    user.mkdir()
    (user / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not a timm-tract embedded data set'):
        ensure_data(user)
    assert (user / 'notes.txt').read_text() == 'keep me' and len(list(user.iterdir())) == 1


def test_default_location_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_TRACT_DATA', str(tmp_path / 'here'))
    assert default_data_dir() == tmp_path / 'here'
    monkeypatch.delenv('TIMM_TRACT_DATA')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert default_data_dir() == tmp_path / 'xdg' / 'timm-tract' / DATASET_NAME


def test_cli_prints_path(built):
    root, _ = built
    env = dict(os.environ, TIMM_TRACT_DATA=str(root), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, '-m', 'timm_tract.cli', 'data'], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(root)  # stdout is only the path: usable as --data-dir "$(timm-tract data)"
    assert '10 classes' in out.stderr and 'train 1437 / validation 360' in out.stderr
