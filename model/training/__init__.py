"""Training: real and synthetic data, patch sampling, augmentation, the curriculum
trainer and its resumable state, and the bundled splits. May import every other part
of ``model``.
"""
