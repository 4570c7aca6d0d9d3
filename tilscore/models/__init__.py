"""Model registry, model cards and weight files (safetensors; nothing is unpickled).

``create_model(name, **kwargs)`` builds an architecture with random weights;
``load_model(name_or_path)`` returns (model, card) from ``models/<name>/`` (card.json +
weights.safetensors) or from a folder path.
"""

from tilscore.models.card import ModelCard
from tilscore.models.registry import ARCHITECTURES, create_model, load_model, save_model

__all__ = ["ARCHITECTURES", "ModelCard", "create_model", "load_model", "save_model"]
