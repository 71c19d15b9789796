"""The jobs the entry points and the notebook API run: typed configs plus `run`.

  finetune.py   classification, regression, XNLI, span QA: data -> shards -> loop -> exports
  distill.py    MiniLM v1 / MiniLMv2 / XtremeDistil students from a frozen teacher
  embed.py      sentence encoders: contrastive pairs -> shards -> loop -> sentence-transformers
"""
