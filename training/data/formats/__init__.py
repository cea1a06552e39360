"""Loaders for labelled image sets: generic "DICOM folder + labels.csv", RSNA Pneumonia, NIH ChestX-ray14.

Why several loaders and one output: training consumes :class:`~training.data.records.Record` only, so a
model trained on synthetic data (which is written in the generic format) can be retrained on a public data
set by swapping the loader. Every loader checks what it reads and raises
:class:`~training.data.records.LabelError` naming the CSV row (1-based line number in the file, the header
being row 1) or the image file, so a broken row is found in seconds, not through a stack trace in the middle
of an epoch.

One module per format family: :mod:`~training.data.formats.generic` (a DICOM folder + ``labels.csv``, what
the synthetic generators write), :mod:`~training.data.formats.rsna` (RSNA Pneumonia),
:mod:`~training.data.formats.nih` (NIH ChestX-ray14); :mod:`~training.data.formats.images` reads any
record's image as a dataset (PNG wrapped), :mod:`~training.data.formats.common` holds what they share (CSV
rows with their line numbers, DICOM header identifiers). Import a loader from its module.
"""
