"""Medical-image input and output: NIfTI (:mod:`model.io.nifti`), DICOM
(:mod:`model.io.dicom`), PNG previews, resampling, and the synthetic phantom case.

Every reader returns a :class:`model.io.volumes.Case` and raises
:class:`model.io.volumes.InputError`. Imports only the root modules of ``model``.
"""
