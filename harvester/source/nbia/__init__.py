"""The NBIA archive (TCIA's search/download API): ``client`` (requests), ``planner`` (Query ->
Plan), ``download`` (one series ZIP to disk), ``source`` (the ``Source`` the engine drives).

The names that lived in ``harvester.source.nbia`` before it became a package stay importable
from here.
"""
from harvester.source.nbia.client import (
    QUERY_ENDPOINTS,
    HostGate,
    NBIAClient,
    RequestError,
    TokenAuth,
    as_int,
    make_session,
    parse_retry_after,
    redact_url,
)
from harvester.source.nbia.source import NBIASource

__all__ = ["NBIAClient", "NBIASource", "TokenAuth", "HostGate", "make_session", "redact_url", "as_int",
           "parse_retry_after", "QUERY_ENDPOINTS", "RequestError"]
