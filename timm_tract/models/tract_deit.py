""" `<arch>_tract` twins of every timm DeiT / DeiT-III (`timm.models.deit`, incl. the distilled variants). First
layer: `patch_embed.proj`; `set_input_size(patch_size=...)` keeps it TrAct.

timm module key of the twins: 'tract_deit'.
"""
from ._builder import register_tract_family

__all__ = []

TWINS = register_tract_family(__name__, 'deit')
