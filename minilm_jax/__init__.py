"""minilm_jax: MiniLM-family BERT encoders in JAX/Flax NNX.

The notebook API lives in `pretrained.py`; the architecture in `config.py`, `model.py`, `heads.py`.
"""

from minilm_jax.config import PRESETS, ModelConfig, get_preset
from minilm_jax.pretrained import Pretrained, from_pretrained
from minilm_jax.runtime import tune_host_malloc

__all__ = ["PRESETS", "ModelConfig", "Pretrained", "from_pretrained", "get_preset",
           "tune_host_malloc"]
