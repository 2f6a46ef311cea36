""" timm-tract: TrAct (Petersen et al., NeurIPS 2024, arXiv:2410.23970) for timm models. """
from .version import __version__
from .errors import TimmTractError
from .layers import TrActConv2d, TrActLinear, apply_tract, remove_tract, is_tract_layer, find_first_layer
from . import functional
from . import models  # noqa: F401  registers the <arch>_tract twins in timm's model registry
from . import optim  # noqa: F401  registers the tract-<base> optimizers in timm's optimizer registry

__all__ = [
    '__version__', 'TrActConv2d', 'TrActLinear', 'apply_tract', 'remove_tract', 'is_tract_layer', 'find_first_layer',
    'functional', 'TimmTractError',
]
