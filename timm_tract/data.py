""" Embedded default data set: real handwritten digits on real photographs, 32×32 RGB, as an ImageFolder.

No data set can be downloaded everywhere, so this one is built from pixels that installed packages ship:

* the label is one of scikit-learn's 1,797 handwritten digit scans (`sklearn.datasets.load_digits`, 8×8, 10 classes,
  ≈180 scans per class),
* the background is a random crop (40–160 px, resized to 32, random flip) of one of 14 scikit-image sample
  photographs (`skimage.data`: scenes, textures, micrographs), its own contrast scaled by 0.3–0.7,
* the digit (resized to 22–30 px, random position) is inked over it in the complement of the background's mean colour
  (jittered), opacity 0.85–1,
* each image then gets its own exposure: contrast ×[0.2, 1] (log-uniform) and a brightness offset that keeps the
  pixels in range, so, like real photographs, images differ widely in contrast and brightness (the condition under
  which plain first-layer gradients are poorly scaled and TrAct helps).

Every digit scan is rendered exactly once; the scans are split per class (stratified, seeded) into train and
validation, so no scan appears in both. The result is written once as `train/<digit>/<scan>.png` and
`validation/<digit>/<scan>.png` plus a `timm_tract_data.json` manifest (counts per class, channel mean/std) into a
cache directory, where every timm tool (train.py `--data-dir`, `create_dataset`) reads it.

Location: `$TIMM_TRACT_DATA` if set, else `$XDG_CACHE_HOME/timm-tract/<name>` (`~/.cache/timm-tract/<name>`).

Fashion-MNIST (`prepare_fashion_mnist`, `timm-tract data fashion-mnist`): the real Zalando data set from local files
(Debian/Ubuntu package `dataset-fashion-mnist`, or any folder with the four idx files), laid out as torchvision's
`ROOT/FashionMNIST/raw/*-ubyte` so timm reads it with `--dataset torch/fashion_mnist --data-dir ROOT`.
"""
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import DataError, OutputExistsError

__all__ = [
    'DATASET_NAME', 'default_data_dir', 'ensure_data', 'build_data', 'read_manifest',
    'FASHION_MNIST', 'FASHION_MNIST_SOURCE', 'KnownDataset', 'KNOWN_DATASETS', 'known_dataset',
    'recorded_statistics', 'cache_root', 'fashion_mnist_dir', 'prepare_fashion_mnist', 'describe_data',
]

DATASET_NAME = 'digits-on-photos-v1'
MANIFEST = 'timm_tract_data.json'
IMG_SIZE = 32
SEED = 0
VAL_FRACTION = 0.2
SPLITS = ('train', 'validation')

# scikit-image sample photographs shipped inside its wheel (no download): real scenes, textures, micrographs
_PHOTOS = (
    'astronaut', 'camera', 'coffee', 'chelsea', 'rocket', 'coins', 'moon', 'clock', 'hubble_deep_field',
    'immunohistochemistry', 'retina', 'grass', 'gravel', 'brick',
)
_CONTRAST_RANGE = (0.2, 1.0)  # log-uniform exposure contrast factor
_CROP_RANGE = (40, 160)  # side of the square background crop in source pixels, before resizing to 32
_DIGIT_RANGE = (22, 30)  # side of the rendered digit in output pixels
_BG_DETAIL_RANGE = (0.3, 0.7)  # share of the background's own contrast kept under the ink


def cache_root() -> Path:
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(cache) / 'timm-tract'


def default_data_dir() -> Path:
    """Where the embedded data set lives: `$TIMM_TRACT_DATA`, else the user cache directory."""
    env = os.environ.get('TIMM_TRACT_DATA')
    if env:
        return Path(env).expanduser()
    return cache_root() / DATASET_NAME


def read_manifest(root: Union[str, Path]) -> Optional[dict]:
    """The manifest of an embedded data set at `root`, or None if `root` holds no complete one."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get('name') == DATASET_NAME else None


def ensure_data(root: Optional[Union[str, Path]] = None) -> Path:
    """Path of the embedded data set, building it first if it is not there yet (≈10 s, ≈4 MB)."""
    root = Path(root) if root is not None else default_data_dir()
    if read_manifest(root) is None:
        build_data(root)
    return root


def build_data(root: Union[str, Path], overwrite: bool = False) -> dict:
    """Render the data set into `root` (atomically: a temporary sibling directory renamed into place).

    Refuses to touch an existing `root` that is not an embedded data set (a user directory), and rebuilds an
    existing embedded data set only with `overwrite=True`. Returns the manifest.
    """
    root = Path(root)
    if root.exists():
        if read_manifest(root) is None and (not root.is_dir() or any(root.iterdir())):
            raise OutputExistsError(
                f'{root} exists and is not a timm-tract embedded data set; refusing to write into it. '
                f'Point TIMM_TRACT_DATA (or --root) at a new or empty directory.')
        if read_manifest(root) is not None and not overwrite:
            raise OutputExistsError(f'{root} already holds the embedded data set; pass overwrite=True to rebuild it.')
    manifest: dict = {}
    _write_atomically(root, lambda tmp: manifest.update(_render_into(tmp)))
    return manifest


def _render_into(out: Path) -> dict:
    from PIL import Image

    digits, labels = _load_digits()
    photos = _load_photos()
    split = _split_indices(labels)
    rng = np.random.default_rng(SEED)
    counts: Dict[str, Dict[str, int]] = {s: {} for s in SPLITS}
    moments = np.zeros((2, 3))  # running sum and sum of squares of train pixels per channel (in [0, 1])
    for index in range(len(labels)):  # render in scan order so every image depends only on the seed
        img = _render_one(digits[index], photos, rng)
        split_name, cls = split[index], str(int(labels[index]))
        folder = out / split_name / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f'{index:04d}.png', optimize=False)
        counts[split_name][cls] = counts[split_name].get(cls, 0) + 1
        if split_name == 'train':
            pix = img.reshape(-1, 3).astype(np.float64) / 255.
            moments += np.stack([pix.mean(0), (pix ** 2).mean(0)])
    n_train = sum(counts['train'].values())
    mean = moments[0] / n_train
    std = np.sqrt(moments[1] / n_train - mean ** 2)
    manifest = {
        'name': DATASET_NAME,
        'img_size': IMG_SIZE,
        'num_classes': len(counts['train']),
        'seed': SEED,
        'val_fraction': VAL_FRACTION,
        'counts': {s: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for s, c in counts.items()},
        'mean': [round(float(m), 4) for m in mean],
        'std': [round(float(s), 4) for s in std],
        'sources': {
            'digits': 'sklearn.datasets.load_digits (1,797 scans, 8x8, 17 grey levels)',
            'backgrounds': 'skimage.data: ' + ', '.join(_PHOTOS),
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    return manifest


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16., bunch.target.astype(np.int64)  # (1797, 8, 8) in [0, 1], (1797,)


def _load_photos() -> List[np.ndarray]:
    import skimage.data

    photos = []
    for name in _PHOTOS:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))  # (H, W, 3) uint8
    return photos


def _split_indices(labels: np.ndarray) -> List[str]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    _, val_idx = train_test_split(idx, test_size=VAL_FRACTION, stratify=labels, random_state=SEED)
    val = set(val_idx.tolist())
    return ['validation' if i in val else 'train' for i in idx]


def _render_one(digit: np.ndarray, photos: List[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One 32×32×3 uint8 image: a digit scan (8×8 in [0, 1]) inked over a photo crop, then re-exposed."""
    from PIL import Image

    photo = photos[rng.integers(len(photos))]
    side = int(rng.integers(_CROP_RANGE[0], min(_CROP_RANGE[1], *photo.shape[:2]) + 1))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR)
    bg = np.asarray(crop, dtype=np.float32) / 255.
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    bg_mean = bg.mean((0, 1))
    bg = bg_mean + (bg - bg_mean) * rng.uniform(*_BG_DETAIL_RANGE)  # background texture fainter than the ink

    size = int(rng.integers(_DIGIT_RANGE[0], _DIGIT_RANGE[1] + 1))
    glyph = Image.fromarray((digit * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    alpha = np.zeros((IMG_SIZE, IMG_SIZE), np.float32)
    y, x = (int(v) for v in rng.integers(0, IMG_SIZE - size + 1, size=2))
    alpha[y:y + size, x:x + size] = np.asarray(glyph, dtype=np.float32) / 255. * rng.uniform(0.85, 1.0)
    # ink contrasts with the background: the complement of its mean colour, jittered
    ink = np.clip(1. - bg_mean + rng.normal(0., 0.15, size=3), 0., 1.).astype(np.float32)
    img = bg * (1. - alpha[..., None]) + ink * alpha[..., None]

    contrast = float(np.exp(rng.uniform(*np.log(_CONTRAST_RANGE))))
    brightness = float(rng.uniform(0., 1. - contrast))
    img = img * contrast + brightness
    return np.clip(np.rint(img * 255.), 0, 255).astype(np.uint8)


# --- Fashion-MNIST from local files ----------------------------------------------------------------------------------

FASHION_MNIST = 'fashion-mnist'
FASHION_MNIST_SOURCE = '/usr/share/datasets/fashion-mnist'  # Debian/Ubuntu package `dataset-fashion-mnist`

@dataclasses.dataclass(frozen=True)
class KnownDataset:
    """What timm-tract knows of a timm data set by name: display name, Hub data set id, class names (None: not
    known without reading the data)."""
    display_name: str
    hub_id: str
    classes: Optional[Tuple[str, ...]] = None


def _torchvision_classes(name: str) -> Tuple[str, ...]:
    import torchvision.datasets
    return tuple(getattr(torchvision.datasets, name).classes)


# timm data set names (`--dataset`) -> facts; class names of torchvision data sets come from torchvision itself
KNOWN_DATASETS: Dict[str, KnownDataset] = {
    'torch/cifar10': KnownDataset('CIFAR-10', 'uoft-cs/cifar10', ('airplane', 'automobile', 'bird', 'cat', 'deer',
                                                                   'dog', 'frog', 'horse', 'ship', 'truck')),
    'torch/cifar100': KnownDataset('CIFAR-100', 'uoft-cs/cifar100'),
    'torch/mnist': KnownDataset('MNIST', 'ylecun/mnist'),
    'torch/fashion_mnist': KnownDataset('Fashion-MNIST', 'zalando-datasets/fashion_mnist'),
    'torch/imagenet': KnownDataset('ImageNet-1k', 'ILSVRC/imagenet-1k'),
    'imagenet': KnownDataset('ImageNet-1k', 'ILSVRC/imagenet-1k'),
}
_FASHION_MNIST_TIMM = 'torch/fashion_mnist'


def known_dataset(name: str) -> Optional[KnownDataset]:
    """The facts of a timm data set name ('torch/cifar10'), None for others; Fashion-MNIST's classes from
    torchvision."""
    facts = KNOWN_DATASETS.get(str(name).lower())
    if facts is not None and facts.classes is None and str(name).lower() == _FASHION_MNIST_TIMM:
        facts = dataclasses.replace(facts, classes=_torchvision_classes('FashionMNIST'))
    return facts
_FM_SIZES = {'train': 60000, 't10k': 10000}
_IDX_MAGIC = {'images': 0x0803, 'labels': 0x0801}  # unsigned bytes, 3 dims (N, 28, 28) / 1 dim (N,)


def fashion_mnist_dir(subset: Optional[Tuple[int, int]] = None) -> Path:
    """Default Fashion-MNIST root in the user cache; a development subset gets its own folder."""
    name = FASHION_MNIST if subset is None else f'{FASHION_MNIST}-dev{subset[0]}-{subset[1]}'
    return cache_root() / name


def prepare_fashion_mnist(
        root: Optional[Union[str, Path]] = None,
        source: Optional[Union[str, Path]] = None,
        subset: Optional[Tuple[int, int]] = None,
        overwrite: bool = False,
) -> Path:
    """Lay out Fashion-MNIST as torchvision reads it (`ROOT/FashionMNIST/raw/*-ubyte`, uncompressed) and return ROOT.

    Args:
        root: where to write (default `fashion_mnist_dir(subset)`); an existing folder that is not a Fashion-MNIST root
            written here is never touched.
        source: folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` (default: `$TIMM_TRACT_FASHION_MNIST`,
            else the Debian package's folder).
        subset: (n_train, n_val) for a development split: the first n_train training images as `train`, the last n_val
            training images in the test files (timm's `validation` split); the official test set stays unused.
            Files are checked for the idx layout (magic, 60,000/10,000 images of 28×28, labels 0-9), not by hash:
            the Debian package's .gz files all differ from torchvision's MD5 sums of the originals.
        overwrite: rewrite an existing root prepared here.
    Returns ROOT, for `--dataset torch/fashion_mnist --data-dir ROOT`. Raises DataError (files missing or invalid,
    bad subset) or OutputExistsError (root is not ours, or holds another subset).
    """
    root = Path(root) if root is not None else fashion_mnist_dir(subset)
    wanted = _subset_record(subset)
    manifest = _read_fm_manifest(root)
    if manifest is not None and not overwrite:
        if manifest.get('subset') == wanted:
            return root
        raise OutputExistsError(f'{root} holds Fashion-MNIST with subset {manifest.get("subset")}, not {wanted}; '
                                f'rebuild it (--rebuild) or give another --root.')
    if manifest is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OutputExistsError(f'{root} exists and is not a Fashion-MNIST folder written by timm-tract; refusing to '
                                f'write into it. Give a new or empty --root.')
    arrays = _read_fm_source(Path(source or os.environ.get('TIMM_TRACT_FASHION_MNIST') or FASHION_MNIST_SOURCE))
    if subset is not None:
        arrays = _dev_split(arrays, *subset)
    _write_atomically(root, _fm_writer(arrays, wanted))
    return root


def _subset_record(subset: Optional[Tuple[int, int]]) -> Optional[dict]:
    if subset is None:
        return None
    n_train, n_val = (int(v) for v in subset)
    if n_train < 1 or n_val < 1 or n_train + n_val > _FM_SIZES['train']:
        raise DataError(f'--subset N_TRAIN N_VAL must be positive and sum to at most {_FM_SIZES["train"]} (the '
                        f'training set, split without overlap), got {n_train} {n_val}.')
    return {'train': f'training images [0, {n_train})',
            'validation': f'training images [{_FM_SIZES["train"] - n_val}, {_FM_SIZES["train"]})'}


def _read_fm_manifest(root: Path) -> Optional[dict]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    raw = root / 'FashionMNIST' / 'raw'
    complete = all((raw / _fm_file(split, kind)).is_file() for split in _FM_SIZES for kind in _IDX_MAGIC)
    return manifest if manifest.get('name') == FASHION_MNIST and complete else None


def _fm_file(split: str, kind: str) -> str:
    return f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"


def _missing_files_error(source: Path, missing: List[str]) -> DataError:
    return DataError(
        f'Fashion-MNIST files not found in {source} (missing {", ".join(missing)}). Get them with '
        f'`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files in {FASHION_MNIST_SOURCE}), or pass --source '
        f'DIR with the four *-ubyte[.gz] files, or, with internet, let torchvision download them: '
        f'--dataset torch/fashion_mnist --dataset-download --data-dir DIR.')


def _read_fm_source(source: Path) -> Dict[Tuple[str, str], np.ndarray]:
    """The four idx files as arrays {(split, kind): uint8 array}, validated (magic, shape, labels, MD5 of .gz)."""
    import gzip

    found, missing = {}, []
    for split in _FM_SIZES:
        for kind in _IDX_MAGIC:
            name = _fm_file(split, kind)
            path = next((p for p in (source / name, source / f'{name}.gz') if p.is_file()), None)
            if path is None:
                missing.append(f'{name}[.gz]')
            found[(split, kind)] = path
    if missing:
        raise _missing_files_error(source, missing)
    arrays = {}
    for (split, kind), path in found.items():
        data = path.read_bytes()
        if path.suffix == '.gz':
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as e:
                raise DataError(f'{path} is not a readable gzip file ({e}); reinstall or download it again.') from None
        arrays[(split, kind)] = _parse_idx(data, path, kind, _FM_SIZES[split])
    return arrays


def _parse_idx(data: bytes, path: Path, kind: str, count: int) -> np.ndarray:
    ndim = 3 if kind == 'images' else 1
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], '>i4')) if len(data) >= header else ()
    expected = (count, 28, 28) if kind == 'images' else (count,)
    if magic != _IDX_MAGIC[kind] or dims != expected or len(data) != header + int(np.prod(expected)):
        raise DataError(f'{path} is not the Fashion-MNIST {kind} file expected (idx magic {magic}, dims {dims}; '
                        f'expected {_IDX_MAGIC[kind]}, {expected}).')
    array = np.frombuffer(data, np.uint8, offset=header).reshape(expected)
    if kind == 'labels' and array.max() > 9:
        raise DataError(f'{path} has labels outside 0..9.')
    return array


_Arrays = Dict[Tuple[str, str], np.ndarray]


def _dev_split(arrays: _Arrays, n_train: int, n_val: int) -> _Arrays:
    train = {kind: arrays[('train', kind)] for kind in _IDX_MAGIC}
    return {**{('train', k): v[:n_train] for k, v in train.items()},
            **{('t10k', k): v[len(v) - n_val:] for k, v in train.items()}}


def _idx_bytes(array: np.ndarray, kind: str) -> bytes:
    return (_IDX_MAGIC[kind].to_bytes(4, 'big') + np.asarray(array.shape, '>i4').tobytes()
            + np.ascontiguousarray(array, np.uint8).tobytes())


def _fm_writer(arrays: Dict[Tuple[str, str], np.ndarray], subset: Optional[dict]):
    """A function writing the torchvision layout and the manifest into a (temporary) folder."""
    def write(out: Path) -> None:
        raw = out / 'FashionMNIST' / 'raw'
        raw.mkdir(parents=True)
        for (split, kind), array in arrays.items():
            (raw / _fm_file(split, kind)).write_bytes(_idx_bytes(array, kind))
        pixels = arrays[('train', 'images')].astype(np.float64) / 255.
        counts = {name: {str(c): int(n) for c, n in enumerate(np.bincount(arrays[(split, 'labels')], minlength=10))}
                  for name, split in (('train', 'train'), ('validation', 't10k'))}
        facts = known_dataset(_FASHION_MNIST_TIMM)
        manifest = {
            'name': FASHION_MNIST, 'display_name': facts.display_name, 'hub_id': facts.hub_id,
            'timm_dataset': _FASHION_MNIST_TIMM, 'img_size': 28, 'in_chans': 1, 'num_classes': 10,
            'classes': list(facts.classes), 'subset': subset, 'counts': counts,
            'mean': [round(float(pixels.mean()), 4)], 'std': [round(float(pixels.std()), 4)],
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    return write


def _write_atomically(root: Path, write) -> None:
    """Run `write(tmp)` on a temporary sibling of `root`, then rename it into place (replacing an old `root`)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', dir=root.parent))
    try:
        write(tmp)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recorded_statistics(data_dir: Optional[Union[str, Path]]) -> Optional[Tuple[List[float], List[float]]]:
    """(mean, std) per channel recorded in the manifest of a data folder timm-tract prepared (the embedded set,
    Fashion-MNIST); None for other folders. `timm-tract train` standardizes such data with them by default."""
    if not data_dir:
        return None
    root = Path(data_dir)
    manifest = read_manifest(root) or _read_fm_manifest(root)
    if manifest is None or 'mean' not in manifest or 'std' not in manifest:
        return None
    return [float(m) for m in manifest['mean']], [float(s) for s in manifest['std']]


def describe_data(data_dir: Optional[Union[str, Path]]) -> Optional[dict]:
    """What a data folder prepared by timm-tract is, for reports and model cards: {'name' (real data set name),
    'hub_id' (or None), 'classes', 'in_chans', 'subset' (None = the full official splits)}; None for other folders."""
    if not data_dir:
        return None
    root = Path(data_dir)
    embedded = read_manifest(root)
    if embedded is not None:
        return {'name': DATASET_NAME, 'hub_id': None, 'classes': list(embedded['counts']['train']), 'in_chans': 3,
                'subset': None}
    fm = _read_fm_manifest(root)
    if fm is not None:
        return {'name': fm['display_name'], 'hub_id': fm['hub_id'], 'classes': fm['classes'], 'in_chans': 1,
                'subset': fm['subset']}
    return None
