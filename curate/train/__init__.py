"""The bundled mini CLIP trainer, its losses and shard dataset, evaluation, and ``compare``."""
