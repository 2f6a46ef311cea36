""" tract-* with timm's layer-wise lr decay (`param_groups_layer_decay`, ViT and ConvNeXt): the TrAct layer is found
across the layer groups and keeps its group's lr scale; a stem frozen by `layer_decay_no_opt_scale` is an error that
says so, and the failed creation leaves the model as it was. """
import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import timm_tract  # noqa: F401  (registers the tract-* optimizers)
from timm_tract import apply_tract, is_tract_layer
from timm_tract.errors import TrActArgumentError

from _stack_helpers import (
    assert_unchanged, first_layer, group_of, random_batch, snapshot, stem_freezing_scale, tiny_model)

pytestmark = pytest.mark.usefixtures('one_thread')

ARCHS = ['vit_tiny_patch16_224', 'convnext_atto']
OPT = dict(lr=1e-2, weight_decay=0.05, layer_decay=0.5)


def _model(arch: str) -> nn.Module:
    return tiny_model(arch, **({'img_size': 32, 'depth': 2} if arch.startswith('vit') else {'depths': (1, 1, 1, 1)}))\
        .double()


def _layout(opt: torch.optim.Optimizer):
    return [(g['lr_scale'], g['weight_decay'], len(g['params']), g.get('use_fallback', False))
            for g in opt.param_groups]


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=4, warmup_epochs=0)
    sched.step(0)  # timm's schedulers apply the groups' lr_scale
    x, y = random_batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize('arch', ARCHS)
def test_tract_layer_keeps_its_layer_decay_group_and_lr_scale(arch):
    model = _model(arch)
    opt = create_optimizer_v2(model, 'tract-adamw', **OPT)
    ref = apply_tract(_model(arch))
    ref_opt = create_optimizer_v2(ref, 'adamw', **OPT)
    assert [m for m in model.modules() if is_tract_layer(m)] == [first_layer(model)]
    assert _layout(opt) == _layout(ref_opt)  # timm's layer groups as they were
    group = group_of(opt, first_layer(model).weight)
    assert group['lr_scale'] == min(g['lr_scale'] for g in opt.param_groups) < 1
    _step(model, opt)
    _step(ref, ref_opt)
    assert group['lr'] == pytest.approx(OPT['lr'] * group['lr_scale'])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize('arch', ARCHS)
def test_stem_frozen_by_layer_decay_is_an_error_and_changes_nothing(arch):
    no_opt = stem_freezing_scale(_model(arch), layer_decay=OPT['layer_decay'])
    model = _model(arch)
    before = snapshot(model)
    with pytest.raises(TrActArgumentError, match=r'layer-wise lr decay froze the first layer .*layer_decay_no_opt_scale'
                                                 r'.*layer_decay_min_scale'):
        create_optimizer_v2(model, 'tract-adamw', layer_decay_no_opt_scale=no_opt, **OPT)
    assert_unchanged(model, before)  # timm's schedule had set requires_grad=False on the stem: given back
    # the fixes the message names work on the same model
    opt = create_optimizer_v2(model, 'tract-adamw', layer_decay_no_opt_scale=no_opt, layer_decay_min_scale=no_opt,
                              **OPT)
    assert group_of(opt, first_layer(model).weight)['lr_scale'] == no_opt
    assert is_tract_layer(first_layer(model))


def test_stem_frozen_by_the_user_stays_frozen_and_gets_the_plain_error():
    model = _model('vit_tiny_patch16_224')
    first_layer(model).weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(TrActArgumentError, match='is not trained by this optimizer'):
        create_optimizer_v2(model, 'tract-adamw', **OPT)
    assert_unchanged(model, before)


def test_muon_fallback_group_keeps_the_lr_scale():
    model = _model('vit_tiny_patch16_224')
    opt = create_optimizer_v2(model, 'tract-adamuon', **OPT)
    plain = create_optimizer_v2(_model('vit_tiny_patch16_224'), 'adamuon', **OPT)
    group = group_of(opt, first_layer(model).weight)
    assert group['use_fallback'] is True and group['params'] == [first_layer(model).weight]
    assert group['lr_scale'] == min(g['lr_scale'] for g in plain.param_groups) < 1
    # ViT's layer-0 decayed group held the patch-embed weight only: that group became the fallback group
    assert [layout[:3] for layout in _layout(opt)] == [layout[:3] for layout in _layout(plain)]
    assert sum(layout[3] for layout in _layout(opt)) == 1


def test_an_earlier_schedule_freeze_is_not_undone():
    """A plain optimizer's layer decay froze the stem (a legitimate choice); a later tract-* over other groups must not
    take that call's record for its own: plain error, stem stays frozen."""
    no_opt = stem_freezing_scale(_model('vit_tiny_patch16_224'), layer_decay=OPT['layer_decay'])
    model = _model('vit_tiny_patch16_224')
    create_optimizer_v2(model, 'adamw', layer_decay_no_opt_scale=no_opt, **OPT)
    assert not first_layer(model).weight.requires_grad
    before = snapshot(model)
    with pytest.raises(TrActArgumentError, match='is not trained by this optimizer'):
        create_optimizer_v2([p for p in model.parameters() if p.requires_grad], 'tract-adamw', lr=1e-3)
    assert_unchanged(model, before)


def test_the_recorder_is_what_create_optimizer_calls_and_returns_timms_groups():
    import timm.optim._optim_factory as factory
    from timm.optim import param_groups_layer_decay
    from timm_tract.optim import _install_layer_decay_recorder
    _install_layer_decay_recorder()  # idempotent: never wraps twice
    assert factory.param_groups_layer_decay.__wrapped__ is param_groups_layer_decay
    a, b = _model('convnext_atto'), _model('convnext_atto')
    recorded = factory.param_groups_layer_decay(a, layer_decay=0.5)
    plain = param_groups_layer_decay(b, layer_decay=0.5)
    assert [{k: v for k, v in g.items() if k != 'params'} for g in recorded] == \
        [{k: v for k, v in g.items() if k != 'params'} for g in plain]
    assert [len(g['params']) for g in recorded] == [len(g['params']) for g in plain]
