"""The notebook API: train and use a loaded model in a few lines.

  clf = minilm_jax.from_pretrained(path, "classification", num_labels=3)
  history = clf.fit(texts, labels, eval=(eval_texts, eval_labels), epochs=1, batch_size=32)
  clf.predict(texts)            # Predictions(labels, probabilities)
  clf.evaluate(texts, labels)   # {"accuracy": ..., "macro_f1": ..., "loss": ...}
  history.plot()                # the curves, inline
  student = minilm_jax.distill(teacher, texts, layers=3, objective="minilm_v2", steps=500)

`fit` is not a second loop: it fills in `recipes.finetune.FinetuneConfig` from its keywords and
runs `recipes.finetune.run_job`, the job `python -m train.finetune` runs, on the texts it is
given (prepared into shards in the run directory, streamed through the same Grain pipeline);
`distill` does the same with `recipes.distill` (`python -m train.distill`).
Keywords are a few short names (`SHORTHANDS`) or any config key written `section__key`
(`optim__weight_decay=0.0`, `loop__eval_every=50`); unknown or mistyped ones are errors, as on
the command line. Ctrl-C (a notebook's interrupt) stops after the step in flight: the model in
memory has the weights of that step, and with an `output_dir` a checkpoint is left that
`fit(..., output_dir=same, resume=True)` continues from. A second `fit` continues training
from the current weights (a fresh optimizer and schedule, as in Keras and sentence-transformers).
"""

from minilm_jax.api.classify import config_for, evaluate, fit, predict
from minilm_jax.api.common import SHORTHANDS, History, Predictions
from minilm_jax.api.distill import DISTILL_SHORTHANDS, distill
from minilm_jax.api.embed import EMBED_SHORTHANDS, fit_pairs
from minilm_jax.api.qa import QA_SHORTHANDS, answer, fit_qa

__all__ = ["DISTILL_SHORTHANDS", "EMBED_SHORTHANDS", "QA_SHORTHANDS", "SHORTHANDS", "History",
           "Predictions", "answer", "config_for", "distill", "evaluate", "fit", "fit_pairs",
           "fit_qa", "predict"]
