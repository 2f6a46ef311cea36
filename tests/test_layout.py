""" The package layout: each module imports only from those before it in the documented order (docs/layout.md), so
the data flow is the import order; `compare.stats`/`compare.report` stay free of argparse, multiprocessing and (at
import) matplotlib. Static: reads the sources with `ast`, imports nothing. """
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'timm_tract'

# the documented order (docs/layout.md); a module may import from any module listed before it
ORDER = [
    'version', 'errors', 'naming', 'functional', 'layers', 'published', 'models', 'optim', 'rundir', 'data', 'flags',
    'train', 'compare.stats', 'compare.report', 'compare.runner', 'compare.run', 'compare', 'cards', 'hub', 'cli',
]


def _module_of(path: Path) -> str:
    """'timm_tract/models/_builder.py' -> 'models'; 'timm_tract/compare/stats.py' -> 'compare.stats'."""
    parts = path.relative_to(PKG).with_suffix('').parts
    if parts[0] == 'compare' and parts[-1] != '__init__':
        return f'compare.{parts[1]}'
    return parts[0]


def _rank(name: str) -> int:
    """Position of a timm_tract module (or a submodule of a package in ORDER) in ORDER."""
    while name not in ORDER and '.' in name:
        name = name.rsplit('.', 1)[0]
    return ORDER.index(name)


def _imported(path: Path):
    """(line, timm_tract module) for every import of the package in `path`, also inside functions."""
    module = _module_of(path)
    package = ['timm_tract', *path.relative_to(PKG).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            names = [target] if node.module else [f'{target}.{a.name}' for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == 'timm_tract' or name.startswith('timm_tract.'):
                inner = name[len('timm_tract.'):] if name != 'timm_tract' else ''
                if inner and _module_of(PKG / (inner.replace('.', '/') + '.py')) != module:
                    yield node.lineno, inner
                elif not inner and module != '__init__':
                    yield node.lineno, 'cli'  # `import timm_tract` (registration) counts as the top of the order


def _sources():
    return sorted(p for p in PKG.rglob('*.py') if p.name != '__init__.py' or p.parent != PKG)


def test_every_module_is_in_the_documented_order():
    assert sorted({_module_of(p) for p in _sources()} - set(ORDER)) == []


@pytest.mark.parametrize('path', _sources(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_only_from_modules_before_it(path):
    module = _module_of(path)
    wrong = [f'line {line}: {target}' for line, target in _imported(path)
             if target.split('.')[0] in {m.split('.')[0] for m in ORDER} and _rank(target) >= _rank(module)
             and not (module == 'compare' and target.startswith('compare.'))]
    if path.name == 'train.py':  # train() imports the package once to register the twins and optimizers
        wrong = [w for w in wrong if not w.endswith(': cli')]
    assert wrong == [], f'{module} imports from modules at or after it in docs/layout.md: {wrong}'


def test_stats_and_report_need_no_argparse_multiprocessing_or_matplotlib():
    for name in ('stats', 'report'):
        tree = ast.parse((PKG / 'compare' / f'{name}.py').read_text())
        top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        top += [n.module or '' for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not [m for m in top if m.split('.')[0] in ('argparse', 'multiprocessing', 'concurrent', 'matplotlib')]
    code = ('import sys, timm_tract.compare as c, timm_tract.cards; c.speedup; '
            'assert "matplotlib" not in sys.modules and "timm_tract.compare.run" not in sys.modules; '
            'assert "timm_tract.compare.runner" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True)
