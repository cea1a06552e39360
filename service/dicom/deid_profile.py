"""The attributes of the PS3.15 Annex E Basic Application Level Confidentiality Profile (Table E.1-1), as
data: which are emptied (Z), which get a dummy (D) and which are removed (X), by DICOM keyword.

Where Table E.1-1 offers a choice (X/Z, X/D, X/Z/D, Z/D) we take the strictest that keeps an image object
readable by an AI server: removal, or an empty value for attributes that are Type 2 in the General
Patient/Study modules (an empty Type 2 value is valid, PS3.5 7.4). Attributes marked U (UIDs) are not
listed: every UID that is not a UID the standard defines is replaced (:mod:`service.dicom.deid`), which is
what the U rows and the "any other UID" rule of PS3.15 E.3.9 ask. The profile's blanket rules (private
attributes, curves 50xx, overlays 60xx) are also applied there, as are the safety nets that catch what
this list leaves: any person name (PN), and any date or time (DA, DT, TM; we do not apply the Retain
Longitudinal Temporal Information option).
"""

from __future__ import annotations

__all__ = ["DUMMY", "EMPTY", "REMOVE", "RESTORED"]

EMPTY: frozenset[str] = frozenset(
    {
        "AccessionNumber",
        "ContentDate",
        "ContentTime",
        "ContrastBolusAgent",
        "FillerOrderNumberImagingServiceRequest",
        "PatientBirthDate",
        "PatientSex",
        "PlacerOrderNumberImagingServiceRequest",
        "ReferringPhysicianName",
        "StudyDate",
        "StudyID",
        "StudyTime",
    }
)
"""Z: kept with an empty value (Type 2 in the modules an image needs)."""

DUMMY: frozenset[str] = frozenset({"PatientID", "PatientName"})
"""D (Table E.1-1 allows it for these Z rows): a pseudonym, new for every map, so a remote server can still
tell two studies of one request apart but cannot link them to a patient."""

REMOVE: frozenset[str] = frozenset(
    """
    AcquisitionComments AcquisitionContextSequence AcquisitionDate AcquisitionDateTime
    AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription AcquisitionTime
    ActualHumanPerformersSequence AdditionalPatientHistory AdmissionID AdmittingDate
    AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID
    Allergies Arbitrary AuthorObserverSequence BranchOfService CassetteID
    CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription
    ConsultingPhysicianName ContentCreatorIdentificationCodeSequence ContentCreatorName ContentSequence
    ContributionDescription CountryOfResidence CurrentPatientLocation CurveDate CurveTime
    CustodialOrganizationSequence DataSetTrailingPadding DerivationDescription DetectorID
    DeviceSerialNumber DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress
    DistributionName EthnicGroup EvaluatorName FrameComments GantryID GeneratorID HumanPerformerName
    HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
    ImagePresentationComments ImagingServiceRequestComments Impressions InstanceCreationDate
    InstanceCreationTime InstitutionAddress InstitutionalDepartmentName InstitutionCodeSequence
    InstitutionName InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence
    InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription
    InterpretationIDIssuer InterpretationRecorder InterpretationText InterpretationTranscriber
    IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID LastMenstrualDate MAC MedicalAlerts
    MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDescription
    ModifyingDeviceID ModifyingDeviceManufacturer NameOfPhysiciansReadingStudy
    NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence OperatorsName
    OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation OriginalAttributesSequence
    OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime ParticipantSequence
    PatientAddress PatientAge PatientBirthName PatientBirthTime PatientComments
    PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
    PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
    PatientReligiousPreference PatientSexNeutered PatientSize PatientState PatientTelephoneNumbers
    PatientTransportArrangements PatientWeight PerformedLocation PerformedProcedureStepDescription
    PerformedProcedureStepEndDate PerformedProcedureStepEndTime PerformedProcedureStepID
    PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedProtocolCodeSequence
    PerformedStationAETitle PerformedStationGeographicLocationCodeSequence PerformedStationName
    PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence PerformingPhysicianName
    PersonAddress PersonIdentificationCodeSequence PersonName PersonTelephoneNumbers
    PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence PlateID PregnancyStatus PreMedication
    ProcedureCodeSequence ProtocolName ReasonForStudy ReasonForTheImagingServiceRequest
    ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientSequence
    ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence ReferencedStudySequence
    ReferringPhysicianAddress ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers
    RegionOfResidence RequestAttributesSequence RequestedContrastAgent RequestedProcedureCodeSequence
    RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
    RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
    ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer ReviewerName
    ROIInterpreter ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepEndDate ScheduledProcedureStepLocation ScheduledProcedureStepStartDate
    ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence ScheduledStationName
    ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
    SecondaryReviewerName SeriesDate SeriesDescription SeriesTime ServiceEpisodeDescription
    ServiceEpisodeID SmokingStatus SpecialNeeds StationName StudyComments StudyDescription StudyIDIssuer
    StudyReadDate StudyVerifiedDate TextComments TextString TimezoneOffsetFromUTC TopicAuthor
    TopicKeywords TopicSubject TopicTitle VerifyingObserverIdentificationCodeSequence
    VerifyingObserverName VerifyingObserverSequence VerifyingOrganization VisitComments
    """.split()
)
"""X: removed, wherever they occur (top level and inside sequence items)."""

RESTORED: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
)
"""Patient and study attributes of the real study, put back on an object a backend returns about it."""
