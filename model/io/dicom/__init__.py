"""DICOM input and output.

Reading a study (:mod:`~model.io.dicom.study`, through :mod:`~model.io.dicom.scan`,
:mod:`~model.io.dicom.classify` and :mod:`~model.io.dicom.slices`); writing the
results as a Segmentation and a Secondary Capture preview (:mod:`~model.io.dicom.seg`,
:mod:`~model.io.dicom.outputs`); writing MR series from volumes, for test studies
(:mod:`~model.io.dicom.write_series`, :mod:`~model.io.dicom.protocols`).
"""
