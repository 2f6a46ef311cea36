""" The tract-<base> optimizers: registry entries, finding the model, kwargs routing, equivalence with apply_tract. """
import copy
import gc

import pytest
import torch
import torch.nn as nn
import timm
from timm.optim import create_optimizer_v2, list_optimizers, get_optimizer_info
from timm.optim._optim_factory import default_registry
from timm.task import ClassificationTask

import timm_tract  # noqa: F401  (registers the tract-* optimizers)
from timm_tract import apply_tract, is_tract_layer
from timm_tract.optim import find_model_of_params, register_tract_optimizers, _module_parent, _param_owner

pytestmark = pytest.mark.usefixtures('one_thread')


def _tiny_resnet(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model('resnet10t', num_classes=3, **kw)


def _batch(seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, size, size, generator=g) * 2 + 0.5
    y = torch.randint(0, 3, (4,), generator=g)
    return x, y


def _steps(model, opt, steps=2, seed=1):
    x, y = _batch(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tract_layers(model):
    return [m for m in model.modules() if is_tract_layer(m)]


# --- registry -------------------------------------------------------------------------------------------------------

def test_every_timm_optimizer_has_a_tract_twin_without_underscore():
    names = list_optimizers('tract-*')
    bases = [n for n in list_optimizers() if not n.startswith('tract-')]
    assert len(bases) > 50  # timm's registry as we know it (sgd, adamw, lamb, lion, ... ~100)
    assert sorted(names) == sorted('tract-' + b for b in bases)
    assert all('_' not in n for n in names)
    for base in ('sgd', 'momentum', 'adamw', 'lamb', 'lion', 'nesterov', 'adahessian'):
        info, tract_info = get_optimizer_info(base), get_optimizer_info('tract-' + base)
        for field in ('has_eps', 'has_momentum', 'has_betas', 'num_betas', 'second_order', 'defaults'):
            assert getattr(tract_info, field) == getattr(info, field), (base, field)
        assert 'TrAct' in tract_info.description


def test_register_is_idempotent_and_covers_late_registrations():
    assert register_tract_optimizers() == []  # everything already registered on import
    info = get_optimizer_info('sgdw')
    default_registry.register(type(info)(name='mysgd', opt_class=torch.optim.SGD, has_eps=False, has_momentum=True))
    try:
        assert register_tract_optimizers() == ['tract-mysgd']
        model = _tiny_resnet()
        opt = create_optimizer_v2(model, 'tract-mysgd', lr=0.1)
        assert type(opt) is torch.optim.SGD and is_tract_layer(model.conv1[0])
    finally:
        default_registry._optimizers.pop('mysgd', None)
        default_registry._optimizers.pop('tract-mysgd', None)


# --- what the hook does ---------------------------------------------------------------------------------------------

def test_tract_sgd_converts_first_layer_in_place_and_returns_base_optimizer():
    model = _tiny_resnet()
    stem = model.conv1[0]  # resnet10t: deep-tiered stem, timm's first_conv 'conv1.0'
    weight = stem.weight
    assert not _tract_layers(model)
    opt = create_optimizer_v2(model, 'tract-sgd', lr=0.1, weight_decay=1e-4)
    assert type(opt) is torch.optim.SGD
    assert opt.defaults['nesterov'] is True and opt.defaults['momentum'] == 0.9  # sgd's registry defaults
    assert _tract_layers(model) == [stem] and stem.weight is weight and stem.tract_lambda == 0.1
    assert any(p is weight for g in opt.param_groups for p in g['params'])
    # same optimizer state layout as the plain base optimizer
    plain = create_optimizer_v2(_tiny_resnet(), 'sgd', lr=0.1, weight_decay=1e-4)
    assert [len(g['params']) for g in opt.param_groups] == [len(g['params']) for g in plain.param_groups]


@pytest.mark.parametrize('opt_name', ['sgd', 'adamw', 'lamb'])
def test_tract_optimizer_equals_apply_tract_plus_base(opt_name):
    ref = apply_tract(_tiny_resnet())
    hooked = _tiny_resnet()
    ref_losses = _steps(ref, create_optimizer_v2(ref, opt_name, lr=0.05, weight_decay=0.01))
    hooked_losses = _steps(hooked, create_optimizer_v2(hooked, 'tract-' + opt_name, lr=0.05, weight_decay=0.01))
    assert hooked_losses == pytest.approx(ref_losses, rel=1e-5)
    for (n, a), b in zip(ref.state_dict().items(), hooked.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    # and TrAct changed something compared to the plain optimizer
    plain = _tiny_resnet()
    _steps(plain, create_optimizer_v2(plain, opt_name, lr=0.05, weight_decay=0.01))
    assert not torch.allclose(plain.conv1[0].weight, hooked.conv1[0].weight, atol=1e-6)


def test_lookahead_prefix_and_kwargs_routing():
    model = _tiny_resnet()
    opt = create_optimizer_v2(
        model, 'lookahead_tract-adamw', lr=1e-3, betas=(0.8, 0.9), eps=1e-7,
        tract_lambda=0.05, tract_sync_gram=True)
    assert type(opt).__name__ == 'Lookahead'
    group = opt.param_groups[0]  # shared with the base optimizer
    assert group['betas'] == (0.8, 0.9) and group['eps'] == 1e-7 and 'amsgrad' in group  # AdamW's options
    assert 'tract_lambda' not in group and 'tract_sync_gram' not in group
    layer, = _tract_layers(model)
    assert layer.tract_lambda == 0.05 and layer.sync_gram is True
    # the step: Lookahead(AdamW) with TrAct λ=0.05 on the stem (sync_gram without a process group = local statistics)
    ref, plain = apply_tract(_tiny_resnet(), tract_lambda=0.05), _tiny_resnet()
    kw = dict(lr=1e-3, betas=(0.8, 0.9), eps=1e-7)
    losses = _steps(model, opt, steps=2)
    assert losses == pytest.approx(_steps(ref, create_optimizer_v2(ref, 'lookahead_adamw', **kw), steps=2), rel=1e-5)
    torch.testing.assert_close(model.conv1[0].weight, ref.conv1[0].weight)
    _steps(plain, create_optimizer_v2(plain, 'lookahead_adamw', **kw), steps=2)
    assert not torch.allclose(plain.conv1[0].weight, model.conv1[0].weight, atol=1e-7)


def test_tract_kwargs_do_not_reach_base_and_are_validated():
    with pytest.raises(ValueError, match='tract_lambda'):
        create_optimizer_v2(_tiny_resnet(), 'tract-sgd', lr=0.1, tract_lambda=-1.0)
    with pytest.raises(TypeError, match='unexpected keyword'):  # a typo reaches the base optimizer and fails there
        create_optimizer_v2(_tiny_resnet(), 'tract-sgd', lr=0.1, tract_lamda=0.1)


def test_tract_lambda_mode_kwarg():
    """`tract_lambda_mode` (train.py: --opt-kwargs tract_lambda_mode=relative) reaches the TrAct layer, not the base
    optimizer; a bad value fails before the model changes; on a TrAct model only an explicit mode is set."""
    model = _tiny_resnet()
    opt = create_optimizer_v2(model, 'tract-sgd', lr=0.1, tract_lambda_mode='relative')
    layer, = _tract_layers(model)
    assert layer.tract_lambda_mode == 'relative' and 'tract_lambda_mode' not in opt.param_groups[0]
    fresh = _tiny_resnet()
    with pytest.raises(ValueError, match='tract_lambda_mode must be one of'):
        create_optimizer_v2(fresh, 'tract-sgd', lr=0.1, tract_lambda_mode='bogus')
    assert _tract_layers(fresh) == []
    create_optimizer_v2(model, 'tract-sgd', lr=0.1)
    assert layer.tract_lambda_mode == 'relative'  # the model's own mode kept
    create_optimizer_v2(model, 'tract-sgd', lr=0.1, tract_lambda_mode='absolute')
    assert layer.tract_lambda_mode == 'absolute'


def test_never_tract_twice_on_a_tract_model():
    model = apply_tract(_tiny_resnet(), tract_lambda=0.2)
    layer, = _tract_layers(model)
    create_optimizer_v2(model, 'tract-sgd', lr=0.1)
    assert _tract_layers(model) == [layer] and layer.tract_lambda == 0.2  # model's own λ kept
    create_optimizer_v2(model, 'tract-sgd', lr=0.1, tract_lambda=0.05)
    assert _tract_layers(model) == [layer] and layer.tract_lambda == 0.05  # explicit λ wins


def test_custom_tract_layer_choice_is_respected():
    model = apply_tract(_tiny_resnet(), layer='conv1.3')  # user picked another conv
    create_optimizer_v2(model, 'tract-sgd', lr=0.1)
    assert type(model.conv1[0]) is nn.Conv2d
    assert _tract_layers(model) == [model.conv1[3]]


@pytest.mark.parametrize('arch,path', [
    ('convnext_atto', 'stem.0'),
    ('vit_tiny_patch16_224', 'patch_embed.proj'),
    ('deit_tiny_patch16_224', 'patch_embed.proj'),
])
def test_first_layer_of_each_family(arch, path):
    model = timm.create_model(arch, num_classes=3, **({} if arch.startswith('convnext') else {'img_size': 32}))
    create_optimizer_v2(model, 'tract-adamw', lr=1e-3, weight_decay=0.05)
    assert _tract_layers(model) == [model.get_submodule(path)]


def test_parameter_iterables_named_params_and_groups():
    model = _tiny_resnet()
    opt = create_optimizer_v2(model.parameters(), 'tract-sgd', lr=0.1)  # a generator: used up once only
    assert is_tract_layer(model.conv1[0])
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))
    model = _tiny_resnet()
    groups = [{'params': (p for n, p in model.named_parameters() if 'fc' not in n)},
              {'params': model.fc.parameters(), 'lr': 0.01}]
    opt = create_optimizer_v2(groups, 'tract-momentum', lr=0.1)
    assert is_tract_layer(model.conv1[0]) and len(opt.param_groups) == 2


def test_model_found_inside_task_and_compile_wrappers():
    # train.py: ClassificationTask(model) registers the model as a child before the optimizer is built
    model = _tiny_resnet()
    task = ClassificationTask(model, device=torch.device('cpu'), verbose=False)
    create_optimizer_v2(task.get_trainable_module(), 'tract-sgd', lr=0.1)
    assert find_model_of_params(list(model.parameters())) is model
    assert is_tract_layer(model.conv1[0])
    # optimizer built on a compiled wrapper: the innermost module holding all parameters is the model
    model = _tiny_resnet()
    compiled = torch.compile(model)
    create_optimizer_v2(compiled, 'tract-sgd', lr=0.1)
    assert is_tract_layer(model.conv1[0])


def test_model_built_on_meta_then_materialized():
    # to_empty() replaces the Parameter objects without a registration hook call
    model = timm.create_model('resnet10t', num_classes=3, device='meta')
    meta_weight = model.conv1[0].weight
    model.to_empty(device='cpu')
    assert model.conv1[0].weight is not meta_weight
    create_optimizer_v2(model, 'tract-sgd', lr=0.1)
    assert _tract_layers(model) == [model.conv1[0]]


def test_frozen_first_layer_is_an_error():
    model = _tiny_resnet()
    model.conv1[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match='not trained by this optimizer'):
        create_optimizer_v2(model, 'tract-sgd', lr=0.1)


def test_untracked_parameters_give_a_clear_error():
    params = [nn.Parameter(torch.zeros(3, 3))]  # never registered on a module
    with pytest.raises(ValueError, match='cannot find the model.*apply_tract'):
        create_optimizer_v2(params, 'tract-sgd', lr=0.1)
    a, b = _tiny_resnet(), _tiny_resnet()
    with pytest.raises(ValueError, match='cannot find the model'):
        create_optimizer_v2(list(a.parameters()) + list(b.parameters()), 'tract-sgd', lr=0.1)


def test_hook_maps_do_not_keep_models_alive():
    gc.collect()
    n_params, n_modules = len(_param_owner), len(_module_parent)
    model = _tiny_resnet()
    assert len(_param_owner) > n_params and len(_module_parent) > n_modules
    ema = copy.deepcopy(model)  # not registered: deepcopy copies __dict__
    assert find_model_of_params(list(ema.parameters())) is None
    del model, ema
    gc.collect()
    assert len(_param_owner) == n_params and len(_module_parent) == n_modules


# --- guards against timm changes the hook depends on ----------------------------------------------------------------

def test_timm_contract_the_hook_relies_on():
    """Fails loudly if timm changes how create_optimizer_v2 reaches a registered opt_class."""
    import timm.optim._optim_factory as factory
    assert factory.default_registry is default_registry
    seen = {}

    def spy(params, **kwargs):
        seen['params'], seen['kwargs'] = params, kwargs
        return torch.optim.SGD(params, lr=0.1)

    default_registry.register(factory.OptimInfo(name='spy-opt', opt_class=spy, has_eps=False, has_momentum=True))
    try:
        model = _tiny_resnet()
        create_optimizer_v2(model, 'lookahead_spy-opt', lr=0.1, weight_decay=1e-4, extra=1)
    finally:
        default_registry._optimizers.pop('spy-opt', None)
    # hyphenated names survive the name parser; parameters arrive as the model's own Parameter objects in groups
    got = {id(p) for g in seen['params'] for p in g['params']}
    assert got == {id(p) for p in model.parameters()}
    assert seen['kwargs']['extra'] == 1 and seen['kwargs']['lr'] == 0.1
    # timm builds models through nn.Module registration, which the hooks observe
    assert find_model_of_params(list(model.parameters())) is model

