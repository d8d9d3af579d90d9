"""lm-eval glue: the `fast_dllm_v2` model (lm.py; importing it registers the model), where
models come from (models.py), scoring, prompts and the bundled tasks (tasks/)."""
