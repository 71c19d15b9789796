"""Command-line weight conversion between Hugging Face checkpoints and minilm_jax directories.

The name table itself lives in `minilm_jax/hf.py` so the library can load HF checkpoints too.
"""
