-- Orthanc auto-routing to lesionserve (docs/integration.md, "PACS administrator's guide").
-- Every new Dermoscopic Photography or VL Photographic instance is sent by C-STORE to the modality
-- "lesionserve" (declared in DicomModalities); lesionserve stores its DICOM SR back in the same study.
-- The SR (Comprehensive SR Storage) never matches, so results are not sent round again.
-- Install: copy to /etc/orthanc/ and list it in "LuaScripts"; tested in tests/e2e/test_orthanc.py.

local TO_LESIONSERVE = {
   ['1.2.840.10008.5.1.4.1.1.77.1.7'] = true,  -- Dermoscopic Photography Image Storage
   ['1.2.840.10008.5.1.4.1.1.77.1.4'] = true,  -- VL Photographic Image Storage
}

function OnStoredInstance(instanceId, tags, metadata, origin)
   if TO_LESIONSERVE[metadata['SopClassUid']] then
      SendToModality(instanceId, 'lesionserve')
   end
end
