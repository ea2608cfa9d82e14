"""A DICOMweb service (QIDO-RS to plan, WADO-RS to fetch): ``client`` (requests, the multipart
parser, DICOM JSON), ``source`` (the ``Source`` the engine drives: its planner and the checks of
each part as it arrives, which the store's streaming sink takes over). The names that lived in
``harvester.source.dicomweb`` before it became a package stay importable from here."""
from harvester.source.dicomweb.client import (
    DICOMwebClient,
    MultipartError,
    MultipartParser,
    dicom_tag,
    json_text,
    multipart_boundary,
)
from harvester.source.dicomweb.source import DICOMwebSource

__all__ = ["DICOMwebSource", "DICOMwebClient", "MultipartParser", "MultipartError", "dicom_tag", "json_text",
           "multipart_boundary"]
