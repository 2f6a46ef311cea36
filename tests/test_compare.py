""" `timm-tract compare`: aggregation, statistics, speed-up, report and plot on known inputs; tiny real runs (also in
parallel workers, identical to sequential); help text; paper recipes. """
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_tract.compare import (
    aggregate, bootstrap_speedup, build_report, epoch_times, format_markdown, paired_differences, plot_report,
    rebuild_report, speedup, t_quantile, write_report)
from timm_tract.errors import CompareError, OutputExistsError, TimmTractError

REPO = Path(__file__).resolve().parents[1]
MACHINE = {'device': 'CPU test', 'platform': 'test-os', 'python': '3', 'torch': 't', 'timm': 'm'}


def _history(finals, start=10.):
    """A run's history: top-1 rising linearly from `start` to `final` over len(finals) epochs (finals = final)."""
    n, final = finals
    return [{'epoch': e, 'eval_top1': start + (final - start) * (e + 1) / n, 'train_loss': 1., 'eval_loss': 1.,
             'eval_top5': 100., 'lr': 0.1} for e in range(n)]


def _runs(finals: dict):
    """finals: {(method, budget): [final top-1 per seed]} -> run dicts."""
    return [{'method': m, 'epochs': b, 'seed': s, 'history': _history((b, f)), 'wall_s': 1.5 * b,
             'cpu_s': (1.2 if m == 'tract' else 1.) * b}
            for (m, b), per_seed in finals.items() for s, f in enumerate(per_seed)]


KNOWN = {
    ('baseline', 2): [50., 52., 54.], ('baseline', 4): [60., 62., 64.], ('baseline', 8): [70., 71., 72.],
    ('tract', 2): [60., 61., 62.], ('tract', 4): [71., 72., 73.], ('tract', 8): [75., 75., 75.],
}


def test_aggregate_mean_and_bessel_std():
    agg = aggregate(_runs(KNOWN))
    rows = {(r['method'], r['epochs']): r for r in agg['table']}
    assert [(r['method'], r['epochs']) for r in agg['table']] == sorted(KNOWN, key=lambda k: (k[0] != 'baseline', k[1]))
    assert rows[('baseline', 2)]['mean'] == pytest.approx(52.) and rows[('baseline', 2)]['std'] == pytest.approx(2.)
    assert rows[('baseline', 8)]['std'] == pytest.approx(1.)  # Bessel: sqrt(((-1)^2 + 0 + 1^2) / 2)
    assert rows[('tract', 8)]['std'] == 0. and rows[('tract', 4)]['n'] == 3
    assert rows[('tract', 4)]['per_seed'] == {'0': 71., '1': 72., '2': 73.}
    curve = next(c for c in agg['curves'] if (c['method'], c['epochs']) == ('baseline', 4))
    assert len(curve['mean']) == 4
    assert curve['mean'][-1] == pytest.approx(62.) and curve['mean'][1] == pytest.approx(10 + 52 / 2)
    assert curve['std'][-1] == pytest.approx(2.)
    assert aggregate(_runs({('tract', 3): [40.]}))['table'][0]['std'] == 0.  # one seed: std 0, not NaN


def test_speedup_reached():
    sp = speedup(aggregate(_runs(KNOWN))['table'])
    assert (sp['baseline_epochs'], sp['tract_epochs']) == (8, 4)
    assert sp['factor'] == pytest.approx(2.) and not sp['lower_bound']
    assert sp['baseline_top1'] == pytest.approx(71.)
    assert 'Speed-up 2.00x' in sp['text'] and '71.00% at 8 epochs' in sp['text']
    assert sp['gain_at_largest'] == pytest.approx(4.) and '(+4.00 points)' in sp['text']  # 75 vs 71 at 8 epochs


def test_speedup_smallest_budget_is_a_lower_bound():
    finals = {**KNOWN, ('tract', 2): [71., 71., 71.]}  # equal to the baseline's best counts as reaching it
    sp = speedup(aggregate(_runs(finals))['table'])
    assert sp['tract_epochs'] == 2 and sp['factor'] == pytest.approx(4.) and sp['lower_bound']
    assert 'Speed-up ≥ 4.00x' in sp['text'] and 'lower bound' in sp['text']


def test_speedup_not_reached_and_ties():
    finals = {k: ([f - 30 for f in v] if k[0] == 'tract' else v) for k, v in KNOWN.items()}
    sp = speedup(aggregate(_runs(finals))['table'])
    assert sp['factor'] is None and sp['tract_epochs'] is None
    assert 'did not reach' in sp['text'] and 'no speed-up' in sp['text']
    # baseline best is tied between 4 and 8 epochs: the smaller budget counts, TrAct at 4 → 1x, not 2x
    tied = {**KNOWN, ('baseline', 4): [70., 71., 72.]}
    sp = speedup(aggregate(_runs(tied))['table'])
    assert (sp['baseline_epochs'], sp['tract_epochs'], sp['factor']) == (4, 4, 1.)
    # TrAct needs a larger budget than the baseline's best: factor below 1
    slower = {**KNOWN, ('tract', 4): [60., 60., 60.], ('baseline', 8): [60., 60., 60.]}
    sp = speedup(aggregate(_runs(slower))['table'])
    assert (sp['baseline_epochs'], sp['tract_epochs']) == (4, 8) and sp['factor'] == pytest.approx(0.5)
    with pytest.raises(CompareError, match='both baseline and tract'):
        speedup(aggregate(_runs({('tract', 2): [1.]}))['table'])


def _report(finals=KNOWN, **kw):
    return build_report(_runs(finals), baseline_label='resnet10t', tract_label='resnet10t_tract', data='toy',
                        recipe='sgd', seeds=[0, 1, 2], wall_clock_s=125.4, machine=MACHINE, publish_dir='runs/x', **kw)


def test_markdown_and_json_report(tmp_path):
    report = _report()
    md = format_markdown(report)
    assert '| method | 2 epochs | 4 epochs | 8 epochs |' in md
    assert '| resnet10t | 52.00 ± 2.00 | 62.00 ± 2.00 | 71.00 ± 1.00 |' in md
    assert '| resnet10t_tract | 61.00 ± 1.00 | 72.00 ± 1.00 | 75.00 ± 0.00 |' in md
    assert 'Speed-up 2.00x' in md and 'CPU test' in md and '2 min 05 s for 18 runs' in md
    # wall 1.5 s per epoch: 3 seeds x (2+4+8) epochs x 1.5 s per method
    assert 'baseline 1 min 03 s, TrAct 1 min 03 s' in md and '`runs/x`' in md
    # paired differences: TrAct - baseline per seed at 2 epochs = 10, 9, 8 -> mean 9, sd 1, t(2) = 4.3027
    assert '| 2 epochs | 3 | +9.00 | [+6.52, +11.48] | TrAct better |' in md
    assert '| 8 epochs | 3 | +4.00 | [+1.52, +6.48] | TrAct better |' in md  # 5, 4, 3
    # speed-up in time: baseline 8-epoch runs (8 s CPU) over TrAct 4-epoch runs (4.8 s CPU); wall 12 s / 6 s
    assert "Speed-up in time to the baseline's best mean top-1: 1.67x in CPU time" in md
    assert 'in wall-clock time 2.00x, which also depends on what else ran on the machine' in md
    # the report opens with a one-line conclusion: epochs, CPU time and the verdict at the largest budget
    assert md.splitlines()[2] == (
        "**Conclusion:** TrAct reached the baseline's best mean top-1 (71.00%) in 4 instead of 8 epochs: 2.00x in "
        "epochs, 1.67x in CPU time; at 8 epochs TrAct − baseline = +4.00 points over 3 seed(s), 95% interval "
        "[+1.52, +6.48]: TrAct better.")
    assert 'speed-up in epochs 2.00–2.00x, in CPU time 1.67–1.67x' in md
    assert 'resnet10t 1.0 s CPU / 1.5 s wall, resnet10t_tract 1.2 s CPU / 1.5 s wall' in md
    assert 'TrAct / baseline CPU time per epoch, median over 9 pairs: 1.20' in md
    # every run's final top-1 and time, without opening the JSON
    assert '| tract-e4-s2 | resnet10t_tract | 4 | 2 | 73.00 | 6 s | 5 s |' in md
    assert '| baseline-e8-s0 | resnet10t | 8 | 0 | 70.00 | 12 s | 8 s |' in md
    paths = write_report(report, str(tmp_path / 'out'))
    loaded = json.loads(Path(paths['json']).read_text())
    assert loaded['speedup']['factor'] == 2. and loaded['wall_clock_s'] == 125.4
    assert [r['verdict'] for r in loaded['paired']] == ['better'] * 3 and loaded['bootstrap']['epochs'] == [2., 2.]
    assert len(loaded['runs']) == 18 and loaded['machine'] == MACHINE
    assert Path(paths['markdown']).read_text() == md
    assert Path(paths['plot']).name == 'compare.png'


def test_t_quantile_known_values():
    # textbook two-sided 95% factors; above the table the expansion must continue smoothly towards 1.96
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (60, 2.000), (120, 1.980)):
        assert t_quantile(df) == pytest.approx(q, abs=6e-4), df
    values = [t_quantile(df) for df in range(1, 500)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 1.96
    with pytest.raises(ValueError):
        t_quantile(0)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip('scipy.stats')
    for df in range(1, 300):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-5), df


def _paired(diffs_by_budget, base=50.):
    """Runs whose TrAct − baseline final top-1 per seed are the given differences."""
    runs = []
    for budget, diffs in diffs_by_budget.items():
        for seed, d in enumerate(diffs):
            runs += [{'method': 'baseline', 'epochs': budget, 'seed': seed, 'history': [{'eval_top1': base + seed}]},
                     {'method': 'tract', 'epochs': budget, 'seed': seed, 'history': [{'eval_top1': base + seed + d}]}]
    return runs


def test_paired_differences_verdicts():
    rows = {r['epochs']: r for r in paired_differences(_paired({
        1: [-3., -2., -4.],       # TrAct behind at the short budget: must show as 'worse'
        2: [1., -1., 0.5, -0.5],  # straddles 0
        4: [2., 2., 2.],          # no spread: the interval is the point
        8: [5.],                  # one seed: no interval
    }))}
    assert rows[1]['mean'] == pytest.approx(-3.) and rows[1]['std'] == pytest.approx(1.)
    assert rows[1]['ci_high'] == pytest.approx(-3. + 4.3027 / 3 ** 0.5) and rows[1]['verdict'] == 'worse'
    assert rows[2]['verdict'] == 'not distinguishable' and rows[2]['n'] == 4
    assert rows[2]['ci_low'] == pytest.approx(-3.1824 * rows[2]['std'] / 2)
    assert rows[4]['verdict'] == 'better' and rows[4]['ci_low'] == rows[4]['ci_high'] == pytest.approx(2.)
    assert rows[8]['verdict'] == 'not determined' and rows[8]['ci_low'] is None
    assert rows[1]['per_seed'] == {'0': -3., '1': -2., '2': -4.}
    md = format_markdown(build_report(_paired({1: [-3., -2., -4.], 2: [1., 2., 3.]}), baseline_label='a',
                                      tract_label='a_tract', data='toy', recipe='r', seeds=[0, 1, 2],
                                      wall_clock_s=1., machine=MACHINE))
    assert '| 1 epoch | 3 | -3.00 | [-5.48, -0.52] | TrAct worse |' in md
    assert '| method | 1 epoch | 2 epochs |' in md


def test_paired_differences_only_use_seeds_both_methods_ran():
    runs = _paired({2: [1., 2., 3.]})
    runs = [r for r in runs if not (r['method'] == 'tract' and r['seed'] == 2)]
    row = paired_differences(runs)[0]
    assert row['n'] == 2 and row['mean'] == pytest.approx(1.5)


def test_bootstrap_speedup_agrees_with_the_rule_and_is_seeded():
    # TrAct at 4 epochs is 1 point above the baseline at 8 in every seed: every resample gives exactly 2x
    boot = bootstrap_speedup(_runs(KNOWN))
    assert boot['determined'] and boot['epochs'] == [2., 2.] and boot['not_reached_share'] == 0.
    assert boot['time'] == [pytest.approx(8 / 4.8)] * 2
    assert boot['lower_bound_share'] == 0. and '2.00–2.00x' in boot['text']
    # noisy cells: the interval widens, the point estimate lies inside, and the same seed gives the same interval
    rng = np.random.default_rng(1)
    finals = {k: list(np.array(v) + rng.normal(0, 4, size=3)) + [v[0] + 1, v[1] - 1]
              for k, v in KNOWN.items()}
    runs = _runs(finals)
    boot, again = bootstrap_speedup(runs, seed=3), bootstrap_speedup(runs, seed=3)
    assert boot == again and boot['n_seeds'] == 5
    point = speedup(aggregate(runs)['table'])['factor']
    if boot['determined']:
        assert boot['epochs'][0] <= point <= boot['epochs'][1]
    else:
        assert boot['epochs'] is None and boot['not_reached_share'] > 0.025


def test_bootstrap_speedup_not_determined():
    # TrAct reaches the baseline's best (71 at 8 epochs) only in resamples that favour its good seed
    finals = {('baseline', 4): [60., 60., 60.], ('baseline', 8): [70., 71., 72.],
              ('tract', 4): [60., 60., 60.], ('tract', 8): [60., 71.5, 80.]}
    boot = bootstrap_speedup(_runs(finals))
    assert not boot['determined'] and boot['epochs'] is None
    assert 0.1 < boot['not_reached_share'] < 0.9 and 'not determined' in boot['text']
    two = bootstrap_speedup(_runs({k: v[:2] for k, v in KNOWN.items()}))
    assert not two['determined'] and 'needs ≥ 3' in two['text']


def test_epoch_times():
    times = epoch_times(_runs(KNOWN))
    assert times['baseline'] == {'runs': 9, 'cpu_per_epoch': 1., 'wall_per_epoch': 1.5}
    assert times['tract']['cpu_per_epoch'] == pytest.approx(1.2)
    assert times['cpu_ratio_median'] == pytest.approx(1.2) and times['pairs'] == 9


def test_rebuild_report_recomputes_statistics(tmp_path):
    report = _report(command='timm-tract compare', jobs=2)
    paths = write_report(report, str(tmp_path))
    old = json.loads(Path(paths['json']).read_text())
    for key in ('paired', 'bootstrap', 'epoch_times', 'time_to_accuracy'):
        del old[key]  # a report written before these existed
    Path(paths['json']).write_text(json.dumps(old))
    new = rebuild_report(str(tmp_path))
    assert new['paired'] == report['paired'] and new['bootstrap'] == report['bootstrap']
    assert new['command'] == 'timm-tract compare' and new['jobs'] == 2 and new['machine'] == MACHINE
    assert '| 2 epochs | 3 | +9.00 |' in Path(paths['markdown']).read_text()
    with pytest.raises(CompareError, match='cannot be read'):
        rebuild_report(str(tmp_path / 'missing'))


def test_help_shows_each_default_once():
    import re
    from timm_tract.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and 'compare' in a.choices).choices
    for name in ('compare', 'data'):
        text = sub[name].format_help()
        assert not re.search(r'\(default: [^)]*\)\s*\(default:', text), name
    text = ' '.join(sub['compare'].format_help().split())
    assert 'TrAct λ of the TrAct runs (default: 0.1)' in text
    assert '--epochs N [N ...] not a compare option' in text and '--seed S [S ...] not a compare option' in text
    assert 'about 5 minutes' not in text and '--jobs N' in text


def _mean_row(mask: np.ndarray) -> float:
    ys, _ = np.nonzero(mask)
    return ys.mean()


def test_plot_draws_methods_where_their_accuracy_is(tmp_path):
    # TrAct flat at 90%, baseline flat at 20%: in both panels the red (TrAct) pixels lie above the blue ones
    finals = {('baseline', 2): [20., 20., 20.], ('baseline', 8): [20., 20., 20.],
              ('tract', 2): [90., 90., 90.], ('tract', 8): [90., 90., 90.]}
    runs = [{'method': m, 'epochs': b, 'seed': s, 'history': [{'epoch': e, 'eval_top1': f} for e in range(b)]}
            for (m, b), per_seed in finals.items() for s, f in enumerate(per_seed)]
    report = build_report(runs, baseline_label='a', tract_label='a_tract', data='toy', recipe='r', seeds=[0, 1, 2],
                          wall_clock_s=1., machine=MACHINE)
    path = tmp_path / 'p.png'
    plot_report(report, str(path))
    img = np.asarray(Image.open(path).convert('RGB')).astype(int)
    assert img.shape == (462, 1210, 3)
    red = (abs(img[..., 0] - 0xd6) < 12) & (abs(img[..., 1] - 0x27) < 12) & (abs(img[..., 2] - 0x28) < 12)
    blue = (abs(img[..., 0] - 0x1f) < 12) & (abs(img[..., 1] - 0x77) < 12) & (abs(img[..., 2] - 0xb4) < 12)
    half = img.shape[1] // 2
    for panel in (slice(0, half), slice(half, None)):
        r, b = red[:, panel].copy(), blue[:, panel].copy()
        r[:80], b[:80] = False, False  # ignore the title / legend corner
        assert r.sum() > 100 and b.sum() > 100
        assert _mean_row(r) < _mean_row(b) - 100  # higher accuracy = higher on the image = smaller row index


def _recipes():
    lines = (REPO / 'scripts' / 'recipes_paper.txt').read_text().splitlines()
    return [shlex.split(ln) for ln in lines if ln.strip() and not ln.lstrip().startswith('#')]


def test_paper_recipes_parse_with_the_real_cli():
    import timm
    from timm.optim import list_optimizers
    from timm_tract.cli import build_parser

    parser = build_parser()
    recipes = _recipes()
    assert len(recipes) == 12
    seen = {}
    for argv in recipes:
        assert argv[0] == 'timm-tract' and argv[1] in ('compare', 'train')
        args = parser.parse_args(argv[1:])  # SystemExit (a failed test) on any unknown or malformed flag
        arch = args.model
        assert timm.is_model(arch) and (arch.endswith('_tract') or timm.is_model(f'{arch}_tract')), arch
        assert args.opt in list_optimizers() and f'tract-{args.opt}' in list_optimizers()
        expected_lambda = 0.1 if argv[1] == 'compare' or arch.endswith('_tract') else None
        assert args.momentum == 0.9 and args.tract_lambda == expected_lambda
        if argv[1] == 'compare':
            assert args.seeds == [0, 1, 2, 3, 4] and args.batch_size == 128 and args.sched == 'cosine'
            assert args.img_size == 32 and args.num_classes == 10 and args.dataset == 'torch/cifar10'
            for budget in args.budgets:
                seen[(arch, args.opt, budget)] = args.lr
        else:
            assert args.batch_size == 256 and args.weight_decay == 1e-4 and args.sched == 'multistep'
            assert args.decay_milestones == [args.epochs // 3, 2 * args.epochs // 3]  # x0.1 at 1/3 and 2/3
            seen[(arch, args.epochs)] = args.lr
    # the paper's baseline-tuned learning rates (notes §2.1, §2.2, §2.4), reused for TrAct
    assert all(seen[('resnet18', 'sgd', b)] == 0.08 for b in (100, 200, 400, 800))
    assert [seen[('resnet18', 'adam', b)] for b in (100, 200, 400, 800)] == [1e-2, 1e-2, 1e-3, 1e-3]
    vit = [seen[('vit_small_patch16_224', 'adam', b)] for b in (100, 200, 400, 800)]
    assert vit == pytest.approx([10 ** -3, 10 ** -3.2, 10 ** -3.5, 10 ** -3.5], rel=1e-3)
    for arch in ('resnet50', 'resnet50_tract'):
        assert [seen[(arch, e)] for e in (30, 60, 90)] == [0.141, 0.1, 0.1]


# --- real runs through timm_tract.train on a small slice of the embedded data ------------------------------------

@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """ImageFolder with 6 train / 3 validation images per class, copied from the embedded data set."""
    import shutil
    from timm_tract.data import build_data

    base = tmp_path_factory.mktemp('embedded') / 'data'
    build_data(base)
    small = tmp_path_factory.mktemp('small')
    for split, n in (('train', 6), ('validation', 3)):
        for cls_dir in sorted((base / split).iterdir()):
            (small / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.glob('*.png'))[:n]:
                shutil.copy(f, small / split / cls_dir.name / f.name)
    return small


def _compare_args(data_dir, out, *extra):
    from timm_tract.compare import build_compare_parser
    return build_compare_parser().parse_args([
        '--data-dir', str(data_dir), '--model', 'test_resnet', '--img-size', '32', '--crop-pct', '1', '-b', '20',
        '--lr', '0.05', '--output', str(out), '--experiment', 'cmp', *extra])


@pytest.mark.slow
def test_compare_end_to_end(small_data, tmp_path, caplog):
    import csv
    import yaml
    from timm_tract.compare import compare

    import logging
    caplog.set_level(logging.INFO, logger='timm_tract.compare')
    report = compare(_compare_args(small_data, tmp_path, '--budgets', '1', '2', '--seeds', '0', '1', '2',
                                   '--jobs', '2'), argv=[])
    out = tmp_path / 'cmp'
    assert {p.name for p in out.iterdir()} == {'report.json', 'report.md', 'compare.png', 'runs'}
    # the plan first, then one line per finished run (its top-1 and time), then a summary (the library logs them; the
    # CLI shows its log on stderr); nothing else
    err = '\n'.join(r.getMessage() for r in caplog.records if r.name == 'timm_tract.compare').splitlines()
    # the data is named by its folder, never by its local path (the label reaches the report and published plot)
    assert err[0] == 'timm-tract compare: test_resnet vs test_resnet_tract on ' + small_data.name
    assert err[1].strip() == ('12 runs = 2 methods x budgets [1, 2] epochs x seeds [0, 1, 2]; 2 at a time, '
                              '1 torch thread each')
    assert err[2].strip().startswith(f'output: {out}')
    progress = err[3:15]
    assert [ln[:7] for ln in progress] == [f'[{i:>2}/12]' for i in range(1, 13)]
    tops = {ln[8:].split()[0]: float(ln.split('top-1')[1].split('%')[0]) for ln in progress}
    assert tops == {f"{r['method']}-e{r['epochs']}-s{r['seed']}": pytest.approx(r['top1'], abs=0.005)
                    for r in report['runs']}
    assert err[15].startswith('done: 12 runs in ') and err[16] == f'report: {out / "report.md"}' and len(err) == 17
    logs = sorted(p.name for p in (out / 'runs').glob('*.log'))
    assert len(logs) == 12 and all((out / 'runs' / name).stat().st_size > 0 for name in logs)
    loaded = json.loads((out / 'report.json').read_text())
    assert len(loaded['runs']) == 12 and loaded['budgets'] == [1, 2] and loaded['seeds'] == [0, 1, 2]
    assert loaded['wall_clock_s'] > 0 and loaded['cpu_s'] > 0 and loaded['machine']['device'].startswith(('CPU', 'GPU'))
    # the table is the mean of the final top-1 that each run wrote to its own summary.csv
    finals = {}
    for run in loaded['runs']:
        run_dir = Path(run['output_dir'])
        rows = list(csv.DictReader(open(run_dir / 'summary.csv')))
        assert len(rows) == run['epochs']
        hp = yaml.safe_load(open(run_dir / 'args.yaml'))
        assert (hp['epochs'], hp['seed']) == (run['epochs'], run['seed'])
        assert hp['model'] == ('test_resnet_tract' if run['method'] == 'tract' else 'test_resnet')
        assert hp['tract_lambda'] == (0.1 if run['method'] == 'tract' else None)
        finals.setdefault((run['method'], run['epochs']), []).append(float(rows[-1]['eval_top1']))
    for row in loaded['table']:
        assert row['mean'] == pytest.approx(np.mean(finals[(row['method'], row['epochs'])]))
        assert row['std'] == pytest.approx(np.std(finals[(row['method'], row['epochs'])], ddof=1))
    # only the TrAct run of the largest budget (first seed) keeps checkpoints: ready to publish
    publish = Path(loaded['publish_dir'])
    assert publish.name == 'tract-e2-s0'
    assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar'} <= {p.name for p in publish.iterdir()}
    assert {p.parent.name for p in (out / 'runs').rglob('*.pth.tar')} == {'tract-e2-s0'}
    assert loaded['num_classes'] == 10  # inferred from the class folders
    md = (out / 'report.md').read_text()
    assert '| test_resnet | ' in md and '| test_resnet_tract | ' in md and loaded['speedup']['text'] in md
    assert len(loaded['paired']) == 2 and loaded['bootstrap']['n_seeds'] == 3 and loaded['jobs'] == 2
    assert all(r['wall_s'] > 0 and r['cpu_s'] > 0 for r in loaded['runs'])
    assert '| tract-e2-s1 | test_resnet_tract | 2 | 1 |' in md
    assert Image.open(out / 'compare.png').size == (1210, 462)
    assert report['paths']['markdown'] == str(out / 'report.md')
    # the output directory is never reused
    with pytest.raises(OutputExistsError, match='holds a finished comparison'):
        compare(_compare_args(small_data, tmp_path, '--budgets', '1', '--seeds', '0'))


@pytest.mark.slow
def test_parallel_runs_equal_sequential_runs(small_data, tmp_path):
    """--jobs changes only how many runs train at a time: every run's history is bitwise the same."""
    from timm_tract.compare import compare

    histories = {}
    for jobs in ('1', '2'):
        report = compare(_compare_args(small_data, tmp_path, '--budgets', '1', '2', '--seeds', '0', '--jobs', jobs,
                                       '--experiment', f'jobs{jobs}'), argv=[])
        assert report['jobs'] == int(jobs) and report['threads_per_run'] == 1
        histories[jobs] = {(r['method'], r['epochs']): r['history'] for r in report['runs']}
    assert len(histories['1']) == 4 and histories['1'] == histories['2']
    assert all(h[-1]['train_loss'] > 0 for h in histories['1'].values())


@pytest.mark.slow
def test_compare_via_optimizer(small_data, tmp_path):
    import yaml
    from timm_tract.compare import compare

    report = compare(_compare_args(small_data, tmp_path, '--budgets', '1', '--seeds', '0', '1', '--tract-via', 'opt',
                                   '--opt', 'sgd'), argv=[])
    opts = {(r['method'], yaml.safe_load(open(Path(r['output_dir']) / 'args.yaml'))['opt']) for r in report['runs']}
    assert opts == {('baseline', 'sgd'), ('tract', 'tract-sgd')}
    assert report['tract_label'] == 'test_resnet + tract-sgd'


def _sleep_task(seconds: float, threads=None) -> dict:
    import time
    time.sleep(seconds)
    return {'slept': seconds, 'threads': threads}


@pytest.mark.slow
def test_parallel_results_arrive_as_each_run_finishes():
    """`done` is called when a run finishes, not when all have: the short task is reported long before the long one.
    `started` is called as each task is handed out: two at once, the third only when a worker is free."""
    import time
    from timm_tract.compare.runner import execute as _execute

    tasks = [{'index': 0, 'cost': 2., 'kwargs': {'seconds': 4.}}, {'index': 1, 'cost': 1., 'kwargs': {'seconds': 0.1}},
             {'index': 2, 'cost': 0.5, 'kwargs': {'seconds': 0.1}}]
    arrived, events = {}, []

    def done(task, result):
        arrived.setdefault(task['index'], (time.time(), result))
        events.append(('done', task['index']))
    _execute(tasks, 2, 1, done, fn=_sleep_task, started=lambda task: events.append(('started', task['index'])))
    assert sorted(arrived) == [0, 1, 2] and arrived[0][1] == {'slept': 4., 'threads': 1}
    assert arrived[0][0] - arrived[2][0] > 2.  # tasks 1 and 2 ran on the second worker while task 0 slept
    assert events == [('started', 0), ('started', 1), ('done', 1), ('started', 2), ('done', 2), ('done', 0)]


def test_jobs_defaults():
    from timm_tract.compare.runner import resolve_jobs as _resolve_jobs
    from timm_tract.flags import cpu_count as _cpu_count

    assert _resolve_jobs(None, 'cpu', 100) == (_cpu_count(), 1)  # CPU: a run per core, one torch thread each
    assert _resolve_jobs(None, 'cpu', 1) == (1, 1) and _resolve_jobs(8, 'cpu', 3) == (3, 1)
    assert _resolve_jobs(None, 'cuda', 12) == (1, None) and _resolve_jobs(2, 'cuda:1', 12) == (2, None)


def test_compare_rejects_bad_input(tmp_path):
    from timm_tract.compare import compare

    with pytest.raises(CompareError, match='--jobs must be >= 1'):
        compare(_compare_args(tmp_path, tmp_path, '--jobs', '0'))
    with pytest.raises(TimmTractError, match='give the baseline'):
        compare(_compare_args(tmp_path, tmp_path, '--model', 'test_resnet_tract'))
    with pytest.raises(ValueError, match='give the baseline'):
        compare(_compare_args(tmp_path, tmp_path, '--opt', 'tract-sgd'))
    with pytest.raises(ValueError, match='no registered TrAct twin.*--tract-via opt'):
        compare(_compare_args(tmp_path, tmp_path, '--model', 'mobilenetv3_small_050'))
    with pytest.raises(ValueError, match='positive'):
        compare(_compare_args(tmp_path, tmp_path, '--budgets', '0'))
    with pytest.raises(SystemExit):
        _compare_args(tmp_path, tmp_path, '--epochs', '3')  # budgets, not --epochs
