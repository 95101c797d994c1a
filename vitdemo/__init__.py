"""vitdemo: see how a Vision Transformer sees.

    import vitdemo
    model = vitdemo.load_model(vitdemo.list_models()[0])
    prediction = model.predict('examples/cat.jpg', top_k=5)
"""
__version__ = '0.1.0'

from .backends import Model, ModelUnavailable, Prediction, list_models, load_model  # noqa: E402

__all__ = ['Model', 'ModelUnavailable', 'Prediction', 'list_models', 'load_model', '__version__']
