-- Auto-routing for pacs-triage: every instance Orthanc stores is also sent to the DICOM modality "triage"
-- (DicomModalities in orthanc.json), except pacs-triage's own results (SR and preview) coming back.
--
-- Why SendToModality and not RestApiPost('/modalities/triage/store', ...): inside OnStoredInstance,
-- SendToModality only queues a "store-scu" operation; Orthanc runs the queued operations in one
-- "Lua" job on its jobs engine, reusing one association for consecutive instances (closed after
-- DicomAssociationCloseDelay seconds idle). Orthanc's ingest never waits for it: OnStoredInstance
-- itself runs on Orthanc's Lua event thread after the instance is stored. A synchronous RestApiPost
-- would block that thread for a whole C-STORE per instance, and the asynchronous variant (body
-- {"Resources": [id], "Asynchronous": true}) creates one job and one association per instance: 500 of
-- each for a 500-slice CT. The price of SendToModality: a failed send is logged ("Lua: Unable to send
-- instance ...") and not retried, so instances stored while pacs-triage is down are not analysed until
-- they are sent again (Orthanc Explorer "Send to DICOM modality", or POST /modalities/triage/store).

local TRIAGE = 'triage'
local OWN_MANUFACTURER = 'pacs-triage'

-- The calling AE title pacs-triage delivers results with is the AE title of the "triage" modality
-- (its listener's AE title), unless PACS_TRIAGE_DELIVERY__CALLING_AE says otherwise.
local function triage_aet()
  local modalities = GetOrthancConfiguration()['DicomModalities'] or {}
  local entry = modalities[TRIAGE]
  if type(entry) == 'table' then
    return entry[1] or entry['AET']
  end
  return nil
end

-- Looked up at the first stored instance, not at load time: the script is loaded while Orthanc holds its
-- configuration lock.
local TRIAGE_AET = nil

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Our own SR and preview (Manufacturer "pacs-triage") must not go back for analysis: that would be a
  -- loop. pacs-triage ignores them too (service/store/validate.py), this just saves the round trip.
  if tags['Manufacturer'] == OWN_MANUFACTURER then
    return
  end
  -- Belt and braces: anything the triage service itself sent us is a result, whatever its Manufacturer.
  if TRIAGE_AET == nil then
    TRIAGE_AET = triage_aet() or ''
  end
  if origin ~= nil and origin['RequestOrigin'] == 'DicomProtocol'
     and TRIAGE_AET ~= '' and origin['RemoteAet'] == TRIAGE_AET then
    return
  end
  SendToModality(instanceId, TRIAGE)
end
