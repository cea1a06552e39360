"""Real peers for end-to-end tests: DCMTK (:mod:`.dcmtk`) and Orthanc (:mod:`.orthanc`)."""
