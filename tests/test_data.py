""" The embedded default data set: built from shipped pixels, balanced, seeded, readable by timm, never clobbering. """
import hashlib
import json
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


# --- Fashion-MNIST: layout preparation from idx files ------------------------------------------------------------

import gzip  # noqa: E402

from timm_tract import data as data_mod  # noqa: E402
from timm_tract.data import FASHION_MNIST_SOURCE, describe_data, prepare_fashion_mnist  # noqa: E402
from timm_tract.errors import DataError, OutputExistsError, TimmTractError  # noqa: E402

_SMALL = {'train': 40, 't10k': 12}


def _idx(array: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, 'big') + np.asarray(array.shape, '>i4').tobytes() + array.astype(np.uint8).tobytes()


@pytest.fixture
def idx_source(tmp_path, monkeypatch):
    """Four small synthetic idx files (gzipped train, plain test) in the Fashion-MNIST names; the expected sizes are
    patched to theirs. Image i of a split has every pixel = i (train) or 200 + i (test), label i % 10."""
    monkeypatch.setattr(data_mod, '_FM_SIZES', dict(_SMALL))
    src = tmp_path / 'src'
    src.mkdir()
    for split, n in _SMALL.items():
        base = 0 if split == 'train' else 200
        images = np.repeat(np.arange(base, base + n, dtype=np.uint8)[:, None, None], 28, 1).repeat(28, 2)
        labels = np.arange(n) % 10
        for kind, blob in (('images-idx3', _idx(images, 0x0803)), ('labels-idx1', _idx(labels, 0x0801))):
            name = f'{split}-{kind}-ubyte'
            if split == 'train':
                (src / f'{name}.gz').write_bytes(gzip.compress(blob))
            else:
                (src / name).write_bytes(blob)
    return src


def test_fashion_mnist_layout_is_torchvisions(idx_source, tmp_path):
    from torchvision.datasets import FashionMNIST

    root = prepare_fashion_mnist(tmp_path / 'fm', source=idx_source)
    raw = root / 'FashionMNIST' / 'raw'
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        f'{s}-{k}-ubyte' for s in _SMALL for k in ('images-idx3', 'labels-idx1'))  # uncompressed
    train, test = FashionMNIST(str(root), train=True), FashionMNIST(str(root), train=False)
    assert (len(train), len(test)) == (40, 12)
    img, label = train[7]
    assert img.mode == 'L' and img.size == (28, 28) and np.asarray(img).min() == 7 and label == 7
    assert np.asarray(test[3][0]).max() == 203
    info = describe_data(root)
    assert info['name'] == 'Fashion-MNIST' and info['hub_id'] == 'zalando-datasets/fashion_mnist'
    assert info['in_chans'] == 1 and info['subset'] is None and info['classes'][0] == 'T-shirt/top'
    manifest = json.loads((root / 'timm_tract_data.json').read_text())
    assert manifest['counts']['train'] == {str(c): 4 for c in range(10)}
    assert manifest['mean'] == [round(19.5 / 255, 4)]  # mean pixel of images 0..39


def test_timm_reads_fashion_mnist_as_grayscale(idx_source, tmp_path):
    from timm.data import create_dataset

    root = prepare_fashion_mnist(tmp_path / 'fm', source=idx_source)
    for split, n in (('train', 40), ('validation', 12)):  # timm's validation split = the test files
        ds = create_dataset('torch/fashion_mnist', root=str(root), split=split)
        assert len(ds) == n and ds[0][0].mode == 'L'


def test_fashion_mnist_development_subset(idx_source, tmp_path):
    from torchvision.datasets import FashionMNIST

    root = prepare_fashion_mnist(tmp_path / 'dev', source=idx_source, subset=(25, 10))
    train, val = FashionMNIST(str(root), train=True), FashionMNIST(str(root), train=False)
    train_px = sorted(int(np.asarray(train[i][0])[0, 0]) for i in range(len(train)))
    val_px = sorted(int(np.asarray(val[i][0])[0, 0]) for i in range(len(val)))
    assert train_px == list(range(25)) and val_px == list(range(30, 40))  # first 25 / last 10 training images
    assert describe_data(root)['subset'] == {'train': 'training images [0, 25)',
                                             'validation': 'training images [30, 40)'}
    with pytest.raises(DataError, match='--subset'):
        prepare_fashion_mnist(tmp_path / 'bad', source=idx_source, subset=(35, 10))  # would overlap
    with pytest.raises(OutputExistsError, match='another --root'):
        prepare_fashion_mnist(root, source=idx_source, subset=(20, 10))  # holds another subset
    assert prepare_fashion_mnist(root, source=idx_source, subset=(20, 10), overwrite=True) == root
    assert len(FashionMNIST(str(root), train=True)) == 20


def test_fashion_mnist_is_prepared_once_and_never_over_user_files(idx_source, tmp_path):
    root = prepare_fashion_mnist(tmp_path / 'fm', source=idx_source)
    stamp = (root / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').stat().st_mtime_ns
    assert prepare_fashion_mnist(root, source=tmp_path / 'nowhere') == root  # ready: the source is not read again
    assert (root / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').stat().st_mtime_ns == stamp
    user = tmp_path / 'mine'
    user.mkdir()
    (user / 'notes.txt').write_text('keep me')
    with pytest.raises(OutputExistsError, match='not a Fashion-MNIST folder'):
        prepare_fashion_mnist(user, source=idx_source)
    assert [p.name for p in user.iterdir()] == ['notes.txt']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary folder left behind


def test_fashion_mnist_missing_or_bad_files(idx_source, tmp_path):
    with pytest.raises(DataError) as info:
        prepare_fashion_mnist(tmp_path / 'a', source=tmp_path / 'empty')
    msg = str(info.value)
    assert 'apt-get install dataset-fashion-mnist' in msg and '--dataset-download' in msg and '--source' in msg
    assert '\n' not in msg and not (tmp_path / 'a').exists()
    (idx_source / 't10k-labels-idx1-ubyte').write_bytes(_idx(np.arange(12) % 10, 0x0803))  # wrong magic
    with pytest.raises(DataError, match='t10k-labels-idx1-ubyte is not the Fashion-MNIST labels file'):
        prepare_fashion_mnist(tmp_path / 'b', source=idx_source)
    (idx_source / 't10k-labels-idx1-ubyte').write_bytes(_idx(np.arange(12) + 5, 0x0801))  # labels 5..16
    with pytest.raises(DataError, match='outside 0..9'):
        prepare_fashion_mnist(tmp_path / 'c', source=idx_source)
    (idx_source / 'train-images-idx3-ubyte.gz').write_bytes(b'not gzip')
    with pytest.raises(DataError, match='not a readable gzip'):
        prepare_fashion_mnist(tmp_path / 'd', source=idx_source)
    assert issubclass(DataError, (TimmTractError, ValueError)) and issubclass(OutputExistsError, FileExistsError)


def test_cli_fashion_mnist_prints_root_only(idx_source, tmp_path, capsys):
    from timm_tract.cli import main

    root = tmp_path / 'fm'
    assert main(['data', 'fashion-mnist', '--root', str(root), '--source', str(idx_source)]) == 0
    out, err = capsys.readouterr()
    assert out == f'{root}\n'
    assert '--dataset torch/fashion_mnist --data-dir' in err and '--in-chans 1' in err and 'train 40' in err
    try:  # cli.main reports a TimmTractError as one line on stderr and exit code 2
        rc, msg = main(['data', '--subset', '10', '10']), capsys.readouterr().err
    except DataError as e:  # (a main that lets it through)
        rc, msg = 2, str(e)
    assert rc == 2 and 'apply to `timm-tract data fashion-mnist` only' in msg


def test_cli_data_root_not_ours_is_a_timm_tract_error(tmp_path, capsys):
    from timm_tract.cli import main

    (tmp_path / 'x.txt').write_text('mine')
    with pytest.raises(OutputExistsError):
        ensure_data(tmp_path)
    try:  # cli.main reports a TimmTractError as one line on stderr and exit code 2
        rc, msg = main(['data', '--root', str(tmp_path)]), capsys.readouterr().err
    except OutputExistsError as e:
        rc, msg = 2, str(e)
    assert rc == 2 and 'not a timm-tract embedded data set' in msg and len(msg.strip().splitlines()) == 1
    assert (tmp_path / 'x.txt').read_text() == 'mine'


@pytest.mark.slow
def test_grayscale_training_end_to_end(idx_source, tmp_path):
    """`--dataset torch/fashion_mnist --in-chans 1`: a 1-channel TrAct model trains and evaluates on the layout."""
    from timm_tract.flags import build_train_parser
    from timm_tract.train import train

    root = prepare_fashion_mnist(tmp_path / 'fm', source=idx_source)
    args = build_train_parser().parse_args([
        '--dataset', 'torch/fashion_mnist', '--data-dir', str(root), '--model', 'resnet10t_tract', '--in-chans', '1',
        '--num-classes', '10', '--img-size', '28', '--crop-pct', '1', '--mean', '0.286', '--std', '0.353', '-b', '8',
        '--epochs', '1', '--lr', '0.05', '--no-aug', '--workers', '0', '--output', str(tmp_path / 'out'),
        '--experiment', 'gray', '--device', 'cpu'])
    result = train(args)
    assert len(result.history) == 1 and result.history[0]['eval_top1'] is not None
    import yaml
    saved = yaml.safe_load(open(Path(result.output_dir) / 'args.yaml'))
    assert saved['in_chans'] == 1 and saved['dataset'] == 'torch/fashion_mnist'


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_SOURCE).is_dir(),
                    reason=f'Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_SOURCE})')
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    from timm.data import create_dataset

    root = prepare_fashion_mnist(tmp_path / 'fm')
    manifest = json.loads((root / 'timm_tract_data.json').read_text())
    assert manifest['counts']['train'] == {str(c): 6000 for c in range(10)}
    assert manifest['counts']['validation'] == {str(c): 1000 for c in range(10)}
    assert manifest['mean'] == [0.286] and manifest['std'] == [0.353]  # the published Fashion-MNIST statistics
    ds = create_dataset('torch/fashion_mnist', root=str(root), split='validation')
    assert len(ds) == 10000 and ds[0][1] == 9  # the first test image is an ankle boot
