"""jizhi: a model-as-a-service server for deep-learning recommendation models."""
__version__ = "0.1.0"
