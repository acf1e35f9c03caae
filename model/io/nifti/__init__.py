"""NIfTI input and output: finding a case's files (:mod:`~model.io.nifti.files`),
opening and checking one image (:mod:`~model.io.nifti.image`, with the header alone in
:mod:`~model.io.nifti.header`), reading a case (:mod:`~model.io.nifti.read`), checking
an upload slab by slab without holding it (:mod:`~model.io.nifti.check`) and writing
results (:mod:`~model.io.nifti.write`).
"""
