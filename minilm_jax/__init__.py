"""minilm_jax: MiniLM-family BERT encoders in JAX/Flax NNX.

The notebook API: `from_pretrained` (pretrained.py) gives a model with its tokenizer, `encode`,
exports and `fit`: classifiers `fit(texts, labels)` / `predict` / `evaluate`, encoders
`fit(anchors, positives)` (contrastive), QA models `fit(squad)` / `answer`; `distill` makes
students (api/).
The architecture is in `config.py`, `model.py`, `heads.py`; the jobs the CLIs run in `recipes/`.
"""

from minilm_jax.api import History, Predictions, distill
from minilm_jax.config import PRESETS, ModelConfig, get_preset
from minilm_jax.pretrained import Pretrained, from_pretrained, packaged_checkpoint
from minilm_jax.runtime import tune_host_malloc

__all__ = ["PRESETS", "History", "ModelConfig", "Predictions", "Pretrained", "distill",
           "from_pretrained", "get_preset", "packaged_checkpoint", "tune_host_malloc"]
