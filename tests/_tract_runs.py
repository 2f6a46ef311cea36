""" Test helpers for Hub publishing tests: train.py-layout runs made by real TrAct training, subprocess helpers. """
import argparse
import csv
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from typing import Optional
from pathlib import Path

import torch
import timm
import yaml

import timm_tract
from timm_tract import rundir
from timm_tract.data import known_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
IMG = 32


def make_run(root: Path, arch: str = 'test_resnet', model_name: str = None, opt: str = 'tract-sgd',
             num_classes: int = 3, epochs: int = 2, ema: bool = False, model_kwargs: dict = None,
             extra_args: dict = None, in_chans: int = 3, data_facts: bool = True) -> Path:
    """A train.py-layout run: real TrAct training steps on a real timm model, real torch.save checkpoints, and (unless
    `data_facts=False`: a run written before timm-tract recorded them) the data facts `timm-tract train` records: the
    class folders' names, or a known timm data set's classes."""
    root.mkdir(parents=True)
    data = root / 'data'
    classes = ['cat', 'dog', 'fish', 'bird', 'frog'][:num_classes]
    for split in ('train', 'validation'):
        for c in classes:
            (data / split / c).mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(model_name or arch, num_classes=num_classes, **(model_kwargs or {}))
    if not (model_name or arch).endswith('_tract'):
        timm_tract.apply_tract(model, 0.1)  # what a tract-* optimizer does at creation
    assert timm_tract.find_first_layer(model) and any(timm_tract.is_tract_layer(m) for m in model.modules())
    opt_ = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, in_chans, IMG, IMG) * 3 + 1, torch.randint(0, num_classes, (4,))
    args = dict(model=model_name or arch, num_classes=num_classes, img_size=IMG, data_dir=str(data), dataset='',
                train_split='train', val_split='validation', epochs=epochs, opt=opt, lr=0.05, momentum=0.9,
                batch_size=4, sched='cosine', model_kwargs=model_kwargs or {}, opt_kwargs={}, output=str(root.parent),
                experiment=root.name, seed=0, amp=False, model_ema=ema, pretrained=False)
    args.update(extra_args or {})
    (root / 'args.yaml').write_text(yaml.safe_dump(args, default_flow_style=False))
    if data_facts:
        known = known_dataset(args['dataset']) if args['dataset'] else None
        rundir.write_data_facts(root, list(known.classes) if known and known.classes else classes)
    rows = []
    for epoch in range(epochs):
        model.train()
        for _ in range(2):
            opt_.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt_.step()
        top1 = 40.0 + 10 * epoch
        rows.append(dict(epoch=epoch, train_loss=loss.item(), eval_loss=loss.item() * 1.1, eval_top1=top1,
                         eval_top5=100.0, lr=0.05))
        ckpt = dict(epoch=epoch, arch=args['model'], state_dict=model.state_dict(), optimizer=opt_.state_dict(),
                    version=2, args=argparse.Namespace(**args), metric=top1)
        if ema:
            ckpt['state_dict_ema'] = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        torch.save(ckpt, root / f'checkpoint-{epoch}.pth.tar')
    torch.save(ckpt, root / 'last.pth.tar')
    torch.save(ckpt, root / 'model_best.pth.tar')
    with open(root / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def checkpoint_weights(run: Path, name: str = 'model_best.pth.tar', key: str = 'state_dict'):
    return timm.utils.load_checkpoint_metadata(str(run / name))[key]


def reference_logits(arch: str, sd, num_classes: int, threads: Optional[int] = None, **kwargs) -> torch.Tensor:
    """Plain timm base model with the checkpoint's weights, on a fixed input. `threads=1` matches the subprocesses of
    `subprocess_env` (one thread), so a bitwise comparison with them does not depend on this process's threading."""
    model = timm.create_model(arch, num_classes=num_classes, **kwargs).eval()
    model.load_state_dict(sd)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.no_grad():
            return model(fixed_input())
    finally:
        torch.set_num_threads(before)


def fixed_input() -> torch.Tensor:
    return torch.linspace(-2, 2, 2 * 3 * IMG * IMG).reshape(2, 3, IMG, IMG)


def subprocess_env(hub_url: str, hf_home: Path, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE'))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET='1', HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    return env


def run_python(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a run directory at `dest` (tests that damage a run work on a copy of a shared one)."""
    shutil.copytree(run_dir, dest)
    return dest
