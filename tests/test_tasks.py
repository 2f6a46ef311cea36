""" tract-* optimizers inside timm's training tasks (timm.task): TrAct goes to the student's first layer, never to a
teacher, in classification, multi-label, logit / feature (with and without projection) and token distillation. """
import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.task import (
    ClassificationTask,
    FeatureDistillationTask,
    LogitDistillationTask,
    MultiLabelClassificationTask,
    TokenDistillationTask,
)

import timm_tract  # noqa: F401  (registers the tract-* optimizers)
from timm_tract import apply_tract
from timm_tract.errors import TrActArgumentError

from _stack_helpers import assert_unchanged, first_layer, random_batch, snapshot, tiny_model, tract_layers

pytestmark = pytest.mark.usefixtures('one_thread')


def _model(arch: str, seed: int = 0) -> nn.Module:
    return tiny_model(arch, seed, **({'img_size': 32} if arch.startswith(('vit', 'deit')) else {}))


def _task(kind: str, student: nn.Module, teacher: nn.Module):
    common = dict(criterion=nn.CrossEntropyLoss(), device=torch.device('cpu'), verbose=False)
    if kind == 'classification':
        return ClassificationTask(student, **common)
    if kind == 'multilabel':
        return MultiLabelClassificationTask(student, criterion=nn.BCEWithLogitsLoss(), verbose=False)
    if kind == 'logit':
        return LogitDistillationTask(student, teacher, **common)
    if kind in ('feature', 'feature-projection'):
        return FeatureDistillationTask(student, teacher, **common)
    return TokenDistillationTask(student, teacher, **common)


# (task kind, student, teacher): resnet10t and resnet18 both have 512 features (no projection); convnext_atto has 320
CASES = [
    ('classification', 'resnet10t', None),
    ('multilabel', 'resnet10t', None),
    ('logit', 'resnet10t', 'convnext_atto'),
    ('feature', 'resnet10t', 'resnet18'),
    ('feature-projection', 'resnet10t', 'convnext_atto'),
    ('token', 'deit_tiny_distilled_patch16_224', 'resnet10t'),
]


@pytest.mark.parametrize('kind,student_arch,teacher_arch', CASES, ids=[c[0] for c in CASES])
def test_tract_goes_to_the_student_first_layer_never_the_teacher(kind, student_arch, teacher_arch):
    student = _model(student_arch)
    teacher = _model(teacher_arch, seed=1) if teacher_arch else None
    task = _task(kind, student, teacher)
    trainable = task.get_trainable_module()
    has_projection = getattr(trainable, 'projection', None) is not None
    assert has_projection == (kind == 'feature-projection')
    opt = create_optimizer_v2(trainable, 'tract-sgd', lr=0.1)
    assert tract_layers(task) == [first_layer(student)]
    assert teacher is None or not tract_layers(teacher)
    trained = {id(p) for g in opt.param_groups for p in g['params']}
    assert id(first_layer(student).weight) in trained
    assert teacher is None or not any(id(p) in trained for p in teacher.parameters())


def test_feature_distillation_step_equals_apply_tract_on_the_student():
    """float64: one task step with tract-sgd == the same task with apply_tract(student) and plain sgd."""
    def run(opt_name, convert):
        student = _model('resnet10t')
        if convert:
            apply_tract(student)
        task = _task('feature-projection', student, _model('convnext_atto', seed=1)).double()
        opt = create_optimizer_v2(task.get_trainable_module(), opt_name, lr=0.1)
        x, y = random_batch(2)
        task.train()
        task(x, y)['loss'].backward()
        opt.step()
        return student
    via_opt, via_apply, plain = run('tract-sgd', False), run('sgd', True), run('sgd', False)
    for (name, a), b in zip(via_opt.state_dict().items(), via_apply.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.allclose(via_opt.conv1[0].weight, plain.conv1[0].weight, atol=1e-8)  # TrAct took effect


def test_a_tract_teacher_is_left_as_it_is():
    """A teacher may be a TrAct model (a *_tract twin): it runs under no_grad, its λ and layers are not touched."""
    teacher = apply_tract(_model('convnext_atto', seed=1), tract_lambda=0.3)
    student = _model('resnet10t')
    task = _task('feature-projection', student, teacher)
    create_optimizer_v2(task.get_trainable_module(), 'tract-sgd', lr=0.1, tract_lambda=0.05)
    assert first_layer(student).tract_lambda == 0.05
    assert tract_layers(teacher) == [teacher.stem[0]] and teacher.stem[0].tract_lambda == 0.3


def test_teacher_parameters_in_the_optimizer_are_refused_and_nothing_changes():
    student, teacher = _model('resnet10t'), _model('convnext_atto', seed=1)
    task = _task('feature-projection', student, teacher)
    before = snapshot(task)
    for params in (task, task.teacher):  # the whole task, or the teacher alone
        with pytest.raises(TrActArgumentError, match=r'distillation teacher .*task\.get_trainable_module\(\)'):
            create_optimizer_v2(params, 'tract-sgd', lr=0.1)
    assert_unchanged(task, before)


def test_parameters_of_two_timm_models_are_ambiguous():
    pair = nn.ModuleDict({'a': _model('resnet10t'), 'b': _model('convnext_atto')})
    with pytest.raises(TrActArgumentError, match='belong to 2 timm models'):
        create_optimizer_v2(pair, 'tract-sgd', lr=0.1)
    assert not tract_layers(pair)
