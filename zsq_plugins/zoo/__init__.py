"""Reference models: ``list_models()``, ``card(name)``, ``load(name)``."""

from zsq_plugins.zoo.registry import MODELS, ModelCard, WeightsSource, card, list_models, load

__all__ = ["MODELS", "ModelCard", "WeightsSource", "card", "list_models", "load"]
