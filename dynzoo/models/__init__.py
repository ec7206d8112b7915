"""Model families; importing this package registers every dynzoo model with timm."""
from ._builder import FAMILIES, MODEL_INFO
from . import fmdconv
from . import attnet
from . import sgdm
from . import a2d2c
from . import odconv
from . import dmf
from . import atconv_transformers


def list_dynzoo_models():
    """Every registered dynzoo model name, sorted."""
    return sorted(MODEL_INFO)
