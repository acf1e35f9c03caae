"""One case from four volumes to a label map: pre-processing, tiling, the three-task
fusion, post-processing and the main-lesion rule, the predictor and the whole-case path
(:func:`model.inference.case.process_case`). Imports the root modules,
:mod:`model.io`, :mod:`model.net` and :mod:`model.evaluation.files`.
"""
