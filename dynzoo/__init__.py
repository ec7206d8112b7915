"""dynzoo: a timm-compatible zoo of dynamic-convolution networks.

``import dynzoo`` registers every model with timm (``timm.create_model('fmdconv_resnet18')``).
"""
__version__ = '0.1.0'

from dynzoo.layers.temperature import set_temperature, get_temperatures, fmdconv_temperature, linear_temperature
from dynzoo.models._hub import CheckpointError, PretrainedUnavailableError
from dynzoo import models  # registers the models with timm
from dynzoo.models import list_dynzoo_models
from dynzoo.models._reparam import reparameterize
from dynzoo.models._upcycle import static_source, upcycle_model, upcycle_state_dict

__all__ = [
    '__version__', 'set_temperature', 'get_temperatures', 'fmdconv_temperature', 'linear_temperature',
    'CheckpointError', 'PretrainedUnavailableError', 'list_dynzoo_models', 'reparameterize',
    'static_source', 'upcycle_model', 'upcycle_state_dict',
]
