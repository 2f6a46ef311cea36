""" `<arch>_tract` twins of every timm ResNet (`timm.models.resnet`: resnet*, resnext*, seresnet*, ecaresnet*,
wide_resnet*, resnetrs*, ...). First layer: `conv1`, or `conv1.0` for the deep stems (c/d/s/t variants).

timm module key of the twins: 'tract_resnet' (`timm.list_models(module='tract_resnet')`).
"""
from ._builder import register_tract_family

__all__ = []  # filled by timm's register_model with the entrypoint names

TWINS = register_tract_family(__name__, 'resnet')
