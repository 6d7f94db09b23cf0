"""Quality: the synthetic shapes task, training the tiny-shapes model, evaluation and kept-token overlays."""
