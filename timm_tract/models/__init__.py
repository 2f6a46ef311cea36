""" `<arch>_tract` model registry: after `import timm_tract`, every timm ResNet, ConvNeXt, ViT and DeiT
architecture has a twin `<arch>_tract` (e.g. `timm.create_model('resnet50_tract', tract_lambda=0.1)`) whose first
layer is a TrAct layer (Petersen et al., NeurIPS 2024, arXiv:2410.23970), with pretrained tags `<arch>_tract.<tag>`
that load timm's `<arch>.<tag>` weights (trained without TrAct).
"""
from ..naming import TRACT_PAPER_ID, tract_base_arch
from ._builder import TrActPretrainedCfg
from . import tract_resnet, tract_convnext, tract_vision_transformer, tract_deit  # noqa: F401 (registers the twins)

__all__ = ['TRACT_PAPER_ID', 'TrActPretrainedCfg', 'tract_base_arch']
