"""Stage 2: features (SQL), training data, LightGBM lambdarank training, the model registry, explanations.

The serving path imports ``features`` and ``registry`` only; ``dataset`` and ``train`` are training code.
"""
