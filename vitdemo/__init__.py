"""vitdemo: see how a Vision Transformer sees."""
__version__ = "0.1.0"
