""" timm's own model tests (`tests/test_models.py` of the timm sdist on PyPI matching the installed timm) run
against the `<arch>_tract` twins.

The sdist is downloaded once with `pip download timm==<version> --no-deps --no-binary :all:` into
$TIMM_TRACT_SDIST_CACHE (default: timm-tract's cache,
`$XDG_CACHE_HOME/timm-tract` or ~/.cache/timm-tract); its `tests/` folder is unpacked into a temporary directory and
run in a pytest subprocess with a small plugin that imports `timm_tract` before collection (so timm's
`list_models()` parametrization sees the twins) and keeps only the items of the representative subset below.

Subset (one twin per first-layer kind, the smallest of each, so the whole run fits the CI budget on 2 cores):
  resnet18 (plain 7x7 stem `conv1`), resnet10t (deep tiered stem `conv1.0`), convnext_atto (patchify stem),
  convnext_atto_ols (overlapping 3x3 stem), vit_tiny_patch16_224 (ViT `patch_embed.proj`),
  deit_tiny_distilled_patch16_224 (DeiT, distilled: VisionTransformerDistilled with two heads).
Tests: forward, backward, default cfgs (meta device; the twin's default tag), torchscript, forward_features, FX
forward / backward / FX+torchscript, plus forward_intermediates and forward_intermediates_features, which timm selects
by module name and which are therefore called directly. A twin runs a test exactly when timm runs that test for the
base architecture (timm's exclusion filters mirrored). Not run: test_model_load_pretrained and
test_model_features_pretrained (they download weights from the Hub; the tags' weights are tested offline in
test_models_registry.py), and test_prune_intermediate_layers_contract (marked by timm as slow and kept out of its CI).
"""
import os
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parent.parent
SUITE_TWINS = {
    'resnet': ['resnet18_tract', 'resnet10t_tract'],
    'convnext': ['convnext_atto_tract', 'convnext_atto_ols_tract'],
    'vision_transformer': ['vit_tiny_patch16_224_tract'],
    'deit': ['deit_tiny_distilled_patch16_224_tract'],
}
TIMM_TESTS = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_default_cfgs_non_std',
    'test_model_forward_torchscript', 'test_model_forward_features', 'test_model_forward_fx',
    'test_model_backward_fx', 'test_model_forward_fx_torchscript',
)
DIRECT_TESTS = ('test_tract_forward_intermediates', 'test_tract_forward_intermediates_features')

# pytest plugin loaded in the subprocess (-p): import timm_tract before collection, keep the subset
_PLUGIN = '''
import os
import timm_tract  # registers the twins before timm's test module parametrizes over list_models()
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm_tract.models import tract_base_arch

TWINS = set(os.environ['TIMM_TRACT_SUITE_TWINS'].split(','))
TESTS = set(os.environ['TIMM_TRACT_SUITE_TESTS'].split(','))
DIRECT = set(os.environ['TIMM_TRACT_SUITE_DIRECT'].split(','))


def _model_name(item):
    callspec = getattr(item, 'callspec', None)
    return callspec.params.get('model_name') if callspec else None


def pytest_collection_modifyitems(config, items):
    collected = {(item.originalname, _model_name(item)) for item in items}
    keep, drop = [], []
    for item in items:
        name = _model_name(item)
        arch, tag = split_model_name_tag(name or '')
        ok = False
        if arch in TWINS and item.originalname in DIRECT:
            ok = True
        elif arch in TWINS and item.originalname in TESTS:
            base = tract_base_arch(arch) + ('.' + tag if tag else '')
            default_tag = get_pretrained_cfg(arch).tag
            ok = (item.originalname, base) in collected and (not tag or tag == default_tag)
        (keep if ok else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
'''

# extra test module placed next to timm's test_models.py: the module-selected intermediates tests, called directly
_DIRECT_MODULE = '''
import os
import pytest
from .test_models import test_model_forward_intermediates as _intermediates
from .test_models import test_model_forward_intermediates_features as _intermediates_features

TWINS = sorted(os.environ['TIMM_TRACT_SUITE_TWINS'].split(','))


@pytest.mark.parametrize('model_name', TWINS)
def test_tract_forward_intermediates(model_name):
    _intermediates(model_name, 1)


@pytest.mark.parametrize('model_name', TWINS)
def test_tract_forward_intermediates_features(model_name):
    _intermediates_features(model_name, 1)
'''


def _sdist_cache() -> Path:
    from timm_tract.data import cache_root
    return Path(os.environ.get('TIMM_TRACT_SDIST_CACHE') or cache_root())


def _fetch_sdist(version: str) -> Path:
    """The timm sdist for `version` from the cache, downloaded from PyPI with pip if missing."""
    cache = _sdist_cache()
    path = cache / f'timm-{version}.tar.gz'
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-deps', '--no-binary', ':all:',
           '--disable-pip-version-check', '-d', str(cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or not path.is_file():
        pytest.fail(
            f'Could not download the timm {version} sdist from PyPI (needed to run timm\'s own tests/test_models.py '
            f'against the *_tract twins). Command: {" ".join(cmd)}\n{out.stdout[-1500:]}{out.stderr[-1500:]}\n'
            f'Fix: allow access to PyPI, or put timm-{version}.tar.gz into {cache} (or point TIMM_TRACT_SDIST_CACHE '
            f'at a folder that has it).', pytrace=False)
    return path


@pytest.fixture(scope='session')
def timm_tests_dir(tmp_path_factory) -> Path:
    """timm's tests/ folder unpacked from the sdist of the installed timm version, plus the direct-call module."""
    sdist = _fetch_sdist(timm.__version__)
    root = tmp_path_factory.mktemp('timm_sdist')
    prefix = f'timm-{timm.__version__}/tests/'
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        assert any(m.name == prefix + 'test_models.py' for m in members), f'{sdist} has no tests/test_models.py'
        safe = dict(filter='data') if hasattr(tarfile, 'data_filter') else {}  # Python >= 3.9.17 / 3.11.4
        tar.extractall(root, members=members, **safe)
    tests = root / prefix
    (tests / 'test_tract_direct.py').write_text(textwrap.dedent(_DIRECT_MODULE))
    plugin_dir = root / 'plugin'
    plugin_dir.mkdir()
    (plugin_dir / 'timm_tract_suite_plugin.py').write_text(textwrap.dedent(_PLUGIN))
    return tests


def _run_timm_suite(tests: Path, twins, junit: Path) -> subprocess.CompletedProcess:
    plugin_dir = tests.parent.parent / 'plugin'
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(plugin_dir), os.environ.get('PYTHONPATH', '')]),
        TIMM_TRACT_SUITE_TWINS=','.join(twins),
        TIMM_TRACT_SUITE_TESTS=','.join(TIMM_TESTS),
        TIMM_TRACT_SUITE_DIRECT=','.join(DIRECT_TESTS),
    )
    env.pop('GITHUB_ACTIONS', None)  # timm's full (non-GitHub) filter set: its exclusions are mirrored anyway
    cmd = [sys.executable, '-m', 'pytest', str(tests / 'test_models.py'), str(tests / 'test_tract_direct.py'),
           '-p', 'timm_tract_suite_plugin', '-p', 'no:cacheprovider', '-q', '-rfE', '--junitxml', str(junit),
           '--rootdir', str(tests.parent), '-W', 'ignore::pytest.PytestUnknownMarkWarning']
    return subprocess.run(cmd, env=env, cwd=str(tests.parent), capture_output=True, text=True, timeout=1800)


def _outcomes(junit: Path):
    """[(test function, model name, outcome)] from a junit XML report."""
    rows = []
    for case in ET.parse(junit).getroot().iter('testcase'):
        name = case.get('name')
        func, _, params = name.partition('[')
        model = next((p for p in params.rstrip(']').split('-') if '_tract' in p), '')
        outcome = 'passed'
        for tag in ('failure', 'error', 'skipped'):
            if case.find(tag) is not None:
                outcome = tag
        rows.append((func, model, outcome))
    return rows


@pytest.mark.slow
def test_timm_model_suite_on_twins(timm_tests_dir, tmp_path):
    twins = [t for family in SUITE_TWINS.values() for t in family]
    junit = tmp_path / 'junit.xml'
    out = _run_timm_suite(timm_tests_dir, twins, junit)
    report = out.stdout[-6000:] + out.stderr[-3000:]
    assert junit.is_file(), report
    rows = _outcomes(junit)
    counts = Counter(outcome for _, _, outcome in rows)
    print(f'timm {timm.__version__} tests/test_models.py on {len(twins)} twins: {dict(counts)}')
    bad = [r for r in rows if r[2] != 'passed']
    assert not bad, f'{bad}\n{report}'
    assert out.returncode == 0, report

    ran = {(func, model.split('.')[0]) for func, model, _ in rows}
    for twin in twins:
        for func in ('test_model_forward', 'test_model_backward', 'test_model_forward_torchscript',
                     'test_model_forward_fx', 'test_model_backward_fx') + DIRECT_TESTS:
            assert (func, twin) in ran, f'{func} did not run for {twin}\n{report}'
        cfg_test = 'test_model_default_cfgs_non_std' if twin.startswith(('vit_', 'deit')) else 'test_model_default_cfgs'
        assert (cfg_test, twin) in ran, f'{cfg_test} did not run for {twin}'
        if not twin.startswith(('vit_', 'deit')):  # timm runs forward_features for CNNs only
            assert ('test_model_forward_features', twin) in ran, twin
