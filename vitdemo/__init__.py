"""vitdemo: see how a Vision Transformer sees.

    import vitdemo
    model = vitdemo.load_model(vitdemo.list_models()[0])
    prediction = model.predict('examples/cat.jpg', top_k=5)
"""
__version__ = '0.1.0'
__all__ = ['Model', 'ModelUnavailable', 'Prediction', 'list_models', 'load_model', '__version__']
# where each name of the API is defined: imported when first asked for, so that importing a torch-free part of the
# package (the app's page) does not import torch
_API = dict(Model='backends', Prediction='backends', load_model='backends', ModelUnavailable='catalog',
            list_models='catalog')


def __getattr__(name: str):
    if name in _API:
        from .lazy import late_import
        return getattr(late_import(f'{__name__}.{_API[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
