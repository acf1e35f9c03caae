"""OM-Net with cross-task guided attention: the network, inference, I/O and training.

The sub-packages import one way, each only from those before it:

* the root modules (:mod:`model.labels`, :mod:`model.defaults`, :mod:`model.atomic`):
  label conventions, the product's defaults, atomic file writes; they import nothing
  from ``model``;
* :mod:`model.io`: medical-image input and output (NIfTI, DICOM, previews, resampling);
* :mod:`model.net`: the network, its building blocks and checkpoints;
* :mod:`model.evaluation.files`: BraTS metrics and matching label files for scoring;
* :mod:`model.inference`: one case from volumes to a post-processed label map;
* :mod:`model.training.trainer`: patch sampling, augmentation and curriculum training.

``model`` never imports ``service`` or ``worker``; ``tests/test_layering.py`` checks
both rules on every import statement.
"""
