-- Orthanc auto-routing to lesionserve (docs/integration.md, "PACS administrator's guide").
-- Every new Dermoscopic Photography or VL Photographic instance is sent by C-STORE to the modality
-- "lesionserve" (declared in DicomModalities); lesionserve stores its DICOM SR back in the same study.
-- The SR (Comprehensive SR Storage) never matches, so results are not sent round again.
-- Install: copy to /etc/orthanc/ and list it in "LuaScripts"; tested in tests/e2e/test_orthanc.py.
--
-- Retries (issue 28, finding 11): each send is an Orthanc job. A job that fails (lesionserve down or
-- restarting, or answering Out of Resources while it drains) is resubmitted, at the next routing event
-- (a new image or a finished send) that comes RETRY_AFTER_S or more after the failure: Orthanc 1.10's Lua
-- has no timer. With no new images an operator resubmits it (Jobs page, or POST /jobs/<id>/resubmit); failed
-- jobs are kept in Orthanc's job history (JobsHistorySize) across its restarts, this script's list is not.

local TO_LESIONSERVE = {
   ['1.2.840.10008.5.1.4.1.1.77.1.7'] = true,  -- Dermoscopic Photography Image Storage
   ['1.2.840.10008.5.1.4.1.1.77.1.4'] = true,  -- VL Photographic Image Storage
}
local RETRY_AFTER_S = 30
local ours = {}    -- job id -> true: the sends this script submitted
local failed = {}  -- job id -> os.time() of its failure

local function retry_failed()
   local now = os.time()
   for job, at in pairs(failed) do
      if now - at >= RETRY_AFTER_S then
         failed[job] = nil
         RestApiPost('/jobs/' .. job .. '/resubmit', '')
      end
   end
end

function OnStoredInstance(instanceId, tags, metadata, origin)
   if TO_LESIONSERVE[metadata['SopClassUid']] then
      local answer = ParseJson(RestApiPost('/modalities/lesionserve/store',
         DumpJson({ Resources = { instanceId }, Asynchronous = true }, true)))
      ours[answer['ID']] = true
   end
   retry_failed()
end

function OnJobFailure(jobId)
   if ours[jobId] then
      failed[jobId] = os.time()
   end
end

function OnJobSuccess(jobId)
   if ours[jobId] then
      ours[jobId] = nil
      retry_failed()
   end
end
