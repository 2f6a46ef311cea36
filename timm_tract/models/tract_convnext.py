""" `<arch>_tract` twins of every timm ConvNeXt (`timm.models.convnext`: convnext_*, convnextv2_*). First layer:
`stem.0`, the patchify conv of the patch stem or the first 3x3 conv of the overlapping (`*_ols`) stems.

timm module key of the twins: 'tract_convnext'.
"""
from ._builder import register_tract_family

__all__ = []

TWINS = register_tract_family(__name__, 'convnext')
