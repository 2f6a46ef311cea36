""" The `<arch>_tract` registry: generated twins of timm's ResNet / ConvNeXt / ViT / DeiT architectures.

Parity samples per family (small models, 32-64 px inputs): resnet18 (plain stem `conv1`), resnet10t (deep tiered
stem `conv1.0`), convnext_atto (patch stem), convnext_atto_ols (overlapping stem), vit_tiny_patch16_224 and
deit_tiny_distilled_patch16_224 (`patch_embed.proj`; distilled = two heads).
"""
import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, list_models
from safetensors.torch import save_file

import timm_tract  # noqa: F401  (registers the twins)
from timm_tract import is_tract_layer, remove_tract
from timm_tract.models import TRACT_PAPER_ID, TrActPretrainedCfg, tract_base_arch

FAMILIES = ('resnet', 'convnext', 'vision_transformer', 'deit')
SAMPLES = {  # base arch -> create_model kwargs for a small real forward
    'resnet18': {},
    'resnet10t': {},
    'convnext_atto': {},
    'convnext_atto_ols': {},
    'vit_tiny_patch16_224': dict(img_size=32),
    'deit_tiny_distilled_patch16_224': dict(img_size=32),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_layer(model):
    return model.get_submodule(model.pretrained_cfg['first_conv'])


def _pair(arch, seed=0, **kwargs):
    """(base, twin) with identical weights (twin loaded strictly from the base)."""
    torch.manual_seed(seed)
    base = timm.create_model(arch, **kwargs)
    twin = timm.create_model(arch + '_tract', **kwargs)
    twin.load_state_dict(base.state_dict(), strict=True)
    return base, twin


# ----------------------------------------------------------------------------------------------------------------
# Registration (no model instantiated)

@pytest.mark.parametrize('family', FAMILIES)
def test_twins_generated_from_timm_registry(family):
    bases = list_models(module=family)
    assert bases, f'timm has no models in module {family}'
    assert sorted(list_models(module='tract_' + family)) == sorted(b + '_tract' for b in bases)
    assert not [m for m in bases if m.endswith('_tract')], 'twins merged into timm\'s own module key'
    for base in bases:
        assert timm.is_model(base + '_tract')
        assert tract_base_arch(base + '_tract') == base
        assert tract_base_arch(base + '_tract.sometag') == base
    assert tract_base_arch(bases[0]) is None


def test_hybrid_vits_left_out():
    hybrids = list_models(module='vision_transformer_hybrid')
    assert hybrids  # e.g. vit_small_r26_s32_224: StdConv2dSame stem of a ResNetV2 backbone
    assert not [h for h in hybrids if timm.is_model(h + '_tract')]
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model(hybrids[0] + '_tract')


@pytest.mark.parametrize('family', FAMILIES)
def test_twin_cfgs_mirror_base_cfgs(family):
    for base in list_models(module=family):
        twin = base + '_tract'
        base_cfgs = get_arch_pretrained_cfgs(base)
        twin_cfgs = get_arch_pretrained_cfgs(twin)
        assert [n.replace(base, twin, 1) for n in base_cfgs] == list(twin_cfgs), 'tags or default tag differ'
        assert get_pretrained_cfg(twin).tag == get_pretrained_cfg(base).tag
        for (base_name, b), (twin_name, t) in zip(base_cfgs.items(), twin_cfgs.items()):
            assert isinstance(t, TrActPretrainedCfg) and t.tract_lambda == 0.1
            assert t.architecture == twin and t.tag == b.tag
            for field in ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'custom_load', 'input_size', 'mean', 'std',
                          'num_classes', 'first_conv', 'classifier', 'pool_size', 'fixed_input_size', 'license'):
                assert getattr(t, field) == getattr(b, field), (twin_name, field)
            assert t.paper_ids[0] == TRACT_PAPER_ID
            assert any(TRACT_PAPER_ID in n for n in t.notes)
            if b.has_weights:
                assert 'WITHOUT TrAct' in t.description and base_name in t.description
    pretrained = list_models(module='tract_' + family, pretrained=True, include_tags=True)
    assert sorted(pretrained) == sorted(n.replace('.', '_tract.', 1) for n in
                                        list_models(module=family, pretrained=True, include_tags=True))


def test_import_instantiates_nothing_and_opens_no_connection():
    code = (
        'import socket, torch, timm\n'
        'made = []\n'
        'init = torch.nn.Module.__init__\n'
        'def counting_init(self, *a, **k):\n'
        '    made.append(type(self).__name__); init(self, *a, **k)\n'
        'torch.nn.Module.__init__ = counting_init\n'
        'def no_net(*a, **k): raise AssertionError("network access at import")\n'
        'socket.socket.connect = socket.create_connection = no_net\n'
        'import timm_tract, json\n'
        'print(json.dumps({"made": made, "twins": len(timm.list_models("*_tract"))}))\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['made'] == []
    assert result['twins'] == sum(len(list_models(module=f)) for f in FAMILIES)


# ----------------------------------------------------------------------------------------------------------------
# Every twin on the meta device

_SLOW_FAMILIES = ('resnet', 'vision_transformer')  # 81 / 163 twins: about a minute on 2 cores, run with the slow tier


@pytest.mark.parametrize('family', [pytest.param(f, marks=pytest.mark.slow) if f in _SLOW_FAMILIES else f
                                    for f in FAMILIES])
def test_every_twin_builds_on_meta_with_tract_first_layer(family):
    for base in list_models(module=family):
        twin = base + '_tract'
        model = timm.create_model(twin, device='meta')
        assert model.pretrained_cfg['architecture'] == twin
        assert model.pretrained_cfg['first_conv'] == get_pretrained_cfg(base).first_conv
        layer = _first_layer(model)
        assert is_tract_layer(layer), f'{twin}: {model.pretrained_cfg["first_conv"]} is {type(layer).__name__}'
        assert layer.tract_lambda == 0.1 and model.pretrained_cfg['tract_lambda'] == 0.1
        assert layer.weight.device.type == 'meta'
        assert sum(is_tract_layer(m) for m in model.modules()) == 1


# ----------------------------------------------------------------------------------------------------------------
# create_model kwargs

def test_create_model_kwargs_pass_through():
    model = timm.create_model('resnet50d_tract', tract_lambda=0.05, num_classes=10, in_chans=1, drop_path_rate=0.1,
                              device='meta')
    layer = model.conv1[0]
    assert is_tract_layer(layer) and layer.tract_lambda == 0.05 and layer.in_channels == 1
    assert model.num_classes == 10 and model.pretrained_cfg['tract_lambda'] == 0.05
    assert model.pretrained_cfg['architecture'] == 'resnet50d_tract'

    vit = timm.create_model('vit_tiny_patch16_224_tract', img_size=48, dynamic_img_size=True, drop_path_rate=0.1)
    assert is_tract_layer(vit.patch_embed.proj) and vit.dynamic_img_size
    assert vit(torch.randn(1, 3, 64, 32)).shape == (1, 1000)  # dynamic size: other than 48

    model = timm.create_model('resnet18_tract', pretrained_cfg_overlay=dict(tract_lambda=0.2), device='meta')
    assert model.conv1.tract_lambda == 0.2

    # a cfg dict carrying tract_lambda (e.g. a twin's own pretrained_cfg, or a config.json naming the twin)
    again = timm.create_model('resnet18_tract', pretrained_cfg=model.pretrained_cfg, device='meta')
    assert again.conv1.tract_lambda == 0.2 and again.pretrained_cfg == model.pretrained_cfg

    with pytest.raises(ValueError, match='tract_lambda'):
        timm.create_model('resnet18_tract', tract_lambda=0.0, device='meta')
    with pytest.raises(TypeError):
        timm.create_model('resnet18_tract', not_a_model_arg=1, device='meta')
    with pytest.raises(RuntimeError, match='Invalid pretrained tag'):
        timm.create_model('resnet18_tract.no_such_tag', device='meta')
    with pytest.raises(ValueError, match='use_naflex'):
        timm.create_model('vit_tiny_patch16_224_tract', use_naflex=True, device='meta')


@pytest.mark.parametrize('arch', ['resnet18', 'resnet10t', 'convnext_atto', 'vit_tiny_patch16_224'])
def test_features_only_keeps_tract_first_layer(arch):
    kwargs = SAMPLES[arch]
    base = timm.create_model(arch, features_only=True, **kwargs)
    twin = timm.create_model(arch + '_tract', features_only=True, **kwargs)
    assert [n for n, m in twin.named_modules() if is_tract_layer(m)] == \
        [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)][:1]
    assert twin.pretrained_cfg['architecture'] == arch + '_tract'
    twin.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(base.eval()(x), twin.eval()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Parity and state-dict interchange, one sample per stem type

@pytest.mark.parametrize('arch', [pytest.param(a, marks=pytest.mark.slow) if a.startswith('vit_') else a
                                  for a in SAMPLES])
def test_state_dicts_interchange_and_outputs_match(arch):
    base, twin = _pair(arch, **SAMPLES[arch])
    assert list(base.state_dict()) == list(twin.state_dict())
    assert all(base.state_dict()[k].shape == v.shape for k, v in twin.state_dict().items())
    with torch.no_grad():  # new twin weights, loaded back into the base
        for p in twin.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    base.load_state_dict(twin.state_dict(), strict=True)  # twin -> base
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), base.eval()(x), rtol=0, atol=0)

    # training: every gradient identical except the first layer's weight gradient (the TrAct one)
    base.train(), twin.train()
    for m in (base, twin):
        m.zero_grad()
        torch.manual_seed(2)  # same dropout / drop-path draws
        m(x).logsumexp(-1).mean().backward()
    first = twin.pretrained_cfg['first_conv'] + '.weight'
    twin_grads = dict(twin.named_parameters())
    for name, p in base.named_parameters():
        if name == first:
            assert not torch.allclose(p.grad, twin_grads[name].grad)
        else:
            torch.testing.assert_close(twin_grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained tags: timm's base weights, loaded from a local file (no network)

@pytest.mark.parametrize('arch,tag', [('resnet18', 'a1_in1k'), ('vit_tiny_patch16_224', 'augreg_in21k_ft_in1k')])
def test_tags_load_the_base_weights(arch, tag, tmp_path):
    torch.manual_seed(3)
    base = timm.create_model(f'{arch}.{tag}')
    weights = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    twin = timm.create_model(f'{arch}_tract.{tag}', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    assert twin.pretrained_cfg['tag'] == tag and twin.pretrained_cfg['architecture'] == f'{arch}_tract'
    for k, v in base.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
    assert is_tract_layer(_first_layer(twin))
    # without the overlay the twin would fetch exactly what timm's base tag fetches
    b, t = get_pretrained_cfg(f'{arch}.{tag}'), get_pretrained_cfg(f'{arch}_tract.{tag}')
    assert (t.hf_hub_id, t.url, t.hf_hub_filename) == (b.hf_hub_id, b.url, b.hf_hub_filename) and b.has_weights

    # timm's first-conv adaptation still applies (in_chans=1), and the head is re-initialised for other classes
    gray = timm.create_model(f'{arch}_tract.{tag}', pretrained=True, in_chans=1, num_classes=5,
                             pretrained_cfg_overlay=dict(file=str(weights)))
    layer = _first_layer(gray)
    assert is_tract_layer(layer) and layer.weight.shape[1] == 1
    torch.testing.assert_close(layer.weight, _first_layer(base).weight.sum(1, keepdim=True))


# ----------------------------------------------------------------------------------------------------------------
# Stem rebuilds keep TrAct

@pytest.mark.parametrize('arch', ['vit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_set_input_size_patch_size_keeps_tract(arch):
    model = timm.create_model(arch + '_tract', img_size=32, tract_lambda=0.3)
    model.set_input_size(img_size=(64, 64))
    assert is_tract_layer(model.patch_embed.proj)
    model.set_input_size(patch_size=8)
    proj = model.patch_embed.proj
    assert is_tract_layer(proj) and proj.tract_lambda == 0.3 and proj.kernel_size == (8, 8)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    copied = copy.deepcopy(model)
    copied.set_input_size(patch_size=4)
    assert is_tract_layer(copied.patch_embed.proj)
    remove_tract(model)
    model.set_input_size(patch_size=16)
    assert type(model.patch_embed.proj) is torch.nn.Conv2d  # a removed TrAct layer stays removed


def test_pruned_resnet_twin_is_pruned_and_tract():
    base = timm.create_model('ecaresnet50d_pruned', device='meta')
    twin = timm.create_model('ecaresnet50d_pruned_tract', device='meta')
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert is_tract_layer(twin.conv1[0])


# ----------------------------------------------------------------------------------------------------------------
# Scripting and export: base outputs; scripted training uses the plain gradient (documented policy)

@pytest.mark.parametrize('arch', ['resnet10t'])  # ViT/DeiT twins are scripted by timm's suite (test_timm_model_suite)
def test_torchscript_save_load_gives_base_outputs(arch):
    base, twin = _pair(arch, **SAMPLES[arch])
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(twin.eval()), buf)
    buf.seek(0)
    scripted = torch.jit.load(buf)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), base.eval()(x), rtol=0, atol=0)

    # training through the scripted model: the ordinary (non-TrAct) first-layer gradient, like the base model
    scripted.train(), base.train()
    first = twin.pretrained_cfg['first_conv'] + '.weight'
    grads = []
    for m in (scripted, base):
        m.zero_grad()
        out = m(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        grads.append(dict(m.named_parameters())[first].grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('arch', ['resnet10t', 'vit_tiny_patch16_224'])
def test_torch_export_gives_base_outputs(arch):
    base, twin = _pair(arch, **SAMPLES[arch])
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(twin.eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), base.eval()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet10t', 'vit_tiny_patch16_224'])
def test_onnx_export_gives_base_outputs(arch, tmp_path):
    import onnxruntime  # test extra; torch's default exporter also needs onnx and onnxscript
    base, twin = _pair(arch, **SAMPLES[arch])
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / 'model.onnx')
    torch.onnx.export(twin.eval(), (x,), path)  # torch's default (dynamo) exporter
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), base.eval()(x), rtol=1e-4, atol=1e-5)


def test_published_manifest_entries_become_tract_tags(tmp_path):
    """An entry of timm_tract's published-weights manifest becomes `<arch>_tract.<tag>` with its Hub id and data cfg,
    marked as trained WITH TrAct, next to the base's tags (whose default stays the default)."""
    from timm.models import generate_default_cfgs
    from timm_tract.models._builder import _twin_cfgs
    from timm_tract.published import published_cfgs

    manifest = tmp_path / 'published.json'
    manifest.write_text(json.dumps([{
        'model': 'resnet18_tract.tract_digits', 'hf_hub_id': 'org/resnet18_tract.tract_digits', 'num_classes': 10,
        'input_size': [3, 32, 32], 'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}]))
    cfgs = _twin_cfgs('resnet18', published_cfgs(manifest)['resnet18_tract'])
    default = generate_default_cfgs(cfgs)['resnet18_tract']
    cfg = default.cfgs['tract_digits']
    assert cfg.hf_hub_id == 'org/resnet18_tract.tract_digits' and cfg.has_weights
    assert cfg.num_classes == 10 and cfg.input_size == (3, 32, 32) and cfg.mean == (0.5, 0.5, 0.5)
    assert cfg.first_conv == 'conv1' and cfg.url == '' and 'WITH TrAct' in cfg.description
    base_default = next(iter(get_arch_pretrained_cfgs('resnet18'))).split('.', 1)[1]
    assert default.tags[0] == base_default
