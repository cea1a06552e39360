"""DICOM pieces shared by the listener (``service.ingest``) and the client (``service.deliver``)."""
