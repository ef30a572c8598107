"""Where hospital systems meet the service: DICOM in (reader, pixel codecs), FHIR out.

Grouped here (docs/overview.md "Layout") so the core (config, runtime, media, batcher, inference, routes)
stays flat; PACS entries (DIMSE, DICOMweb) and DICOM SR results belong here too.
"""
