""" Muon family (tract-muon, tract-nmuon, tract-adamuon, tract-nadamuon): the TrAct layer's weight goes to the
AdamW fallback group (timm's `use_fallback` groups, as `fallback_list` builds them), never to Newton-Schulz, and its
update is the fallback optimizer's update of the TrAct gradient. """
import pytest
import torch
import torch.nn as nn
from timm.optim import NAdamW, create_optimizer_v2

import timm_tract  # noqa: F401  (registers the tract-* optimizers)
from timm_tract import apply_tract, is_tract_layer

from _stack_helpers import first_layer, group_of, random_batch, tiny_model

pytestmark = pytest.mark.usefixtures('one_thread')

WD = 0.05


def _model(arch: str) -> nn.Module:
    return tiny_model(arch, **({'img_size': 32, 'depth': 2} if arch.startswith('vit') else {})).double()


def _backward(model: nn.Module) -> None:
    x, y = random_batch(1)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _fallback_reference(group: dict, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One step of the fallback Muon uses for `group` (AdamW, NAdamW with nesterov) on `weight` with `grad`."""
    w = nn.Parameter(weight.detach().clone())
    w.grad = grad.clone()
    kw = dict(lr=group['lr'] * group['fallback_lr_scale'], betas=group['betas'], eps=group['eps'],
              weight_decay=group['weight_decay'])
    (NAdamW if group['nesterov'] else torch.optim.AdamW)([w], **kw).step()
    return w.detach()


CASES = [('resnet10t', 'muon'), ('resnet10t', 'nmuon'), ('resnet10t', 'adamuon'), ('resnet10t', 'nadamuon'),
         ('vit_tiny_patch16_224', 'adamuon')]


@pytest.mark.parametrize('arch,base', CASES, ids=[f'{a}-{b}' for a, b in CASES])
def test_tract_weight_is_on_the_fallback_and_gets_its_update_of_the_tract_gradient(arch, base):
    model = _model(arch)
    weight = first_layer(model).weight
    opt = create_optimizer_v2(model, 'tract-' + base, lr=0.01, weight_decay=WD)
    plain_opt = create_optimizer_v2(_model(arch), base, lr=0.01, weight_decay=WD)
    # its own group: a copy of the decayed group's options with use_fallback=True; every other group as plain Muon's
    group = group_of(opt, weight)
    assert group['use_fallback'] is True and len(group['params']) == 1 and group['weight_decay'] == WD
    others = [(len(g['params']), g['weight_decay'], g.get('use_fallback', False)) for g in opt.param_groups
              if g is not group]
    plain = [(len(g['params']) - (g['weight_decay'] == WD), g['weight_decay'], g.get('use_fallback', False))
             for g in plain_opt.param_groups]  # timm's decayed group held the stem weight
    assert others == plain

    ref = apply_tract(_model(arch))  # same init, TrAct layer, no optimizer: its weight gradient is the TrAct one
    _backward(ref)
    _backward(model)
    torch.testing.assert_close(weight.grad, first_layer(ref).weight.grad, rtol=1e-12, atol=1e-15)
    expected = _fallback_reference(group, weight, first_layer(ref).weight.grad)
    opt.step()
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-10, atol=1e-13)

    # plain Muon orthogonalizes the same weight's update instead: a different step
    plain_model = apply_tract(_model(arch))
    plain_opt = create_optimizer_v2(plain_model, base, lr=0.01, weight_decay=WD)
    _backward(plain_model)
    plain_opt.step()
    assert not torch.allclose(first_layer(plain_model).weight, expected, rtol=0, atol=1e-6)


def test_a_fallback_list_naming_the_stem_is_kept():
    model = _model('resnet10t')
    opt = create_optimizer_v2(model, 'tract-muon', lr=0.01, weight_decay=WD, fallback_list=['conv1.0.*'])
    plain = create_optimizer_v2(_model('resnet10t'), 'muon', lr=0.01, weight_decay=WD, fallback_list=['conv1.0.*'])
    assert [len(g['params']) for g in opt.param_groups] == [len(g['params']) for g in plain.param_groups]
    assert group_of(opt, first_layer(model).weight)['use_fallback'] is True
    assert is_tract_layer(model.conv1[0])


def test_parameter_list_without_groups():
    model = _model('resnet10t')
    opt = create_optimizer_v2(list(model.parameters()), 'tract-adamuon', lr=0.01)
    assert len(opt.param_groups) == 2
    assert group_of(opt, first_layer(model).weight) == {**opt.param_groups[0], 'params': [first_layer(model).weight],
                                                   'use_fallback': True}


def test_a_model_that_already_has_tract_gets_the_same_grouping():
    model = apply_tract(_model('resnet10t'), tract_lambda=0.2)
    opt = create_optimizer_v2(model, 'tract-nadamuon', lr=0.01, weight_decay=WD)
    assert group_of(opt, first_layer(model).weight)['use_fallback'] is True
    assert first_layer(model).tract_lambda == 0.2
