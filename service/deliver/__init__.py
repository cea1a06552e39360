"""Results back to the PACS: the DICOM client (:mod:`.scu`) and the outbox loops (:mod:`.dicom`)."""
