"""Fast-dLLM v2 in plain PyTorch: shapes (config), the model with its K/V buffer, checkpoint
loading, layer-reuse policies, block-diffusion decoding, the fast path and its benchmark."""
