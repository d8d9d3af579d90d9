"""reuse_exp: layer reuse in Fast-dLLM v2 block diffusion, tracked with MLflow."""
__version__ = "0.1.0"
