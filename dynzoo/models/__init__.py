"""Model families; importing this package registers every dynzoo model with timm."""
from ._builder import FAMILIES, MODEL_INFO
from . import fmdconv


def list_dynzoo_models():
    """Every registered dynzoo model name, sorted."""
    return sorted(MODEL_INFO)
