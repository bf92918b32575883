"""The label values of a phantom's label map (the keys of its ``dataset.json`` ``labels``)."""

from __future__ import annotations

__all__ = ["BACKGROUND", "BODY", "BONE", "KIDNEY", "LABEL_NAMES", "LESION", "LESION_HOSTS", "LIVER", "LUNG", "SPLEEN"]

BACKGROUND = 0  #: air outside the body
BODY = 1  #: soft tissue, fat, muscle, vessels, heart, bowel, spinal canal
LUNG = 2  #: left and right lung (vessels inside included)
LIVER = 3
KIDNEY = 4  #: left and right kidney (parenchyma; the fatty hilum is BODY)
SPLEEN = 5
LESION = 6  #: tumour, inside liver, kidney, spleen or lung
BONE = 7  #: spine and ribs

#: Label value -> name (the names are the keys of ``dataset.json``'s ``labels``).
LABEL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    BODY: "body",
    LUNG: "lung",
    LIVER: "liver",
    KIDNEY: "kidney",
    SPLEEN: "spleen",
    LESION: "lesion",
    BONE: "bone",
}

#: Organs a lesion may sit in.
LESION_HOSTS: tuple[int, ...] = (LIVER, LUNG, KIDNEY, SPLEEN)
