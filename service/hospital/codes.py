"""Clinical codes shared by the DICOM SR and the FHIR report, so that both say the same thing.

SNOMED CT concepts that are exactly one HAM10000 class. Sources: DICOM PS3.16 (pydicom's concept
table) for 1162635006; SNOMED CT International browser pages for 400096001 and 254701007. akiec
(actinic keratosis AND Bowen's disease), bkl (seborrhoeic keratosis, solar lentigo, lichen-planus-like
keratosis) and vasc (angiomas, angiokeratomas, pyogenic granulomas, haemorrhage) are groups with no
single concept; df has one, but its id could not be checked against a terminology server from here,
so it stays private rather than risk a wrong code in a patient record.
"""

from __future__ import annotations

SNOMED_CT_URI = "http://snomed.info/sct"  # FHIR's system URI for SNOMED CT ("SCT" in DICOM)

SNOMED_CLASSES: dict[str, tuple[str, str]] = {
    "mel": ("1162635006", "Malignant melanoma"),
    "nv": ("400096001", "Melanocytic nevus"),
    "bcc": ("254701007", "Basal cell carcinoma of skin"),
}
DERMOSCOPIC_PHOTOGRAPHY = ("446078004", "Dermoscopic photography")  # the SR's procedure reported
