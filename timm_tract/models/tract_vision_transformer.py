""" `<arch>_tract` twins of every timm ViT (`timm.models.vision_transformer`, class VisionTransformer: vit_*,
flexivit_*, ...). First layer: `patch_embed.proj`; `set_input_size(patch_size=...)` keeps it TrAct.

Not covered: the hybrid ViTs of `timm.models.vision_transformer_hybrid` (vit_*_r26_*, vit_*_r50_*, vit_*_resnet*,
vit_base_mci_224): their first layer is the conv stem of a ResNet(V2) backbone, a weight-standardized `StdConv2dSame`
(whose output is not linear in the stored weight, so TrAct's gradient does not apply) or a MobileCLIP conv stem;
and ViTs built as NaFlexVit (`use_naflex=True` / TIMM_USE_NAFLEXVIT=true), which embed padded patch sequences.

timm module key of the twins: 'tract_vision_transformer'.
"""
from ._builder import register_tract_family

__all__ = []

TWINS = register_tract_family(__name__, 'vision_transformer')
