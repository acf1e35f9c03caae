"""Scoring: the BraTS metrics (:mod:`~model.evaluation.metrics`) and matching predicted
and reference label files (:mod:`~model.evaluation.files`). Imports the root modules
and :mod:`model.io`.
"""
