"""torch.hub entrypoints: one per registered dynzoo model, generated from timm's registry.

    model = torch.hub.load('<owner>/dynzoo', 'attnet_t2', pretrained=False)
    model = torch.hub.load('/path/to/checkout', 'fmdconv_resnet18', source='local')
"""
dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

import timm as _timm

import dynzoo as _dynzoo


def _make_entrypoint(name):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)
    entrypoint.__name__ = name
    entrypoint.__doc__ = (f'{name} (dynzoo). Same arguments as timm.create_model({name!r}, ...): pretrained, '
                          'num_classes, features_only, pretrained_cfg_overlay=dict(file=...), ...')
    return entrypoint


for _name in _dynzoo.list_dynzoo_models():
    globals()[_name] = _make_entrypoint(_name)

__all__ = _dynzoo.list_dynzoo_models()
