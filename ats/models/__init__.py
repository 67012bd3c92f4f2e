"""Model wrappers and model sources."""
from .gmm import GaussianMixture
from .wrapper import GUIDANCE_TYPES, MODEL_TYPES, expand_dims, model_wrapper

__all__ = ["GaussianMixture", "model_wrapper", "expand_dims", "MODEL_TYPES", "GUIDANCE_TYPES"]
