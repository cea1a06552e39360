"""DICOM ingest: the C-STORE listener (:mod:`service.ingest.scp`)."""
