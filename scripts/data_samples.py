""" Write docs/embedded_data.png: the first 12 training images of every class of the embedded data set. """
import sys

from PIL import Image

from timm_tract.data import ensure_data


def main(out: str = 'docs/embedded_data.png', per_class: int = 12, scale: int = 2) -> None:
    root = ensure_data()
    classes = sorted((root / 'train').iterdir(), key=lambda p: int(p.name))
    cell = 34
    grid = Image.new('RGB', (per_class * cell, len(classes) * cell), 'white')
    for row, cls_dir in enumerate(classes):
        for col, path in enumerate(sorted(cls_dir.glob('*.png'))[:per_class]):
            grid.paste(Image.open(path).convert('RGB'), (col * cell + 1, row * cell + 1))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(out)
    print(out)


if __name__ == '__main__':
    main(*sys.argv[1:2])
