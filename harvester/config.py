"""The run's configuration: one frozen dataclass, built once by the CLI (or the library API)
and passed down. Nothing below reads argv or the environment."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_API_URL = "https://nbia.cancerimagingarchive.net/nbia-api/services/v4"
NLST_API_URL = "https://nlst.cancerimagingarchive.net/nbia-api/services/v4"
NLST_COLLECTIONS = frozenset({"NLST"})


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token credentials for v2-era or private NBIA installs.

    ``password`` is held only in memory; ``__repr__`` hides it so it can never reach a log.
    """

    token_url: str
    username: str
    password: str = field(repr=False)
    client_id: str = "nbia"

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return f"AuthConfig(token_url={self.token_url!r}, username={self.username!r}, password='***')"


@dataclass(frozen=True)
class Limits:
    """Safety limits applied to every downloaded ZIP.

    Expansion is bounded by sizes, never by a compression ratio (real segmentations deflate at
    over 800:1): each entry by ``max_entry_bytes``, and all entries together by the series'
    announced size (FileSize / TotalSizeInBytes) plus ``max_series_overhead`` and
    ``series_slack_bytes`` (room for LICENSE and md5hashes.csv).
    """

    max_entry_bytes: int = 4 * 1024**3          # one DICOM file
    max_series_overhead: float = 0.10           # extracted may exceed the announced size by this much
    series_slack_bytes: int = 16 << 20          # ... plus this much
    max_entries: int = 200_000


PER_INSTANCE_MODES = ("auto", "always", "never")
#: ``per_instance="auto"``: a series this large goes instance by instance when one connection
#: is slow for it (a per-connection cap would make it take its size over one stream's speed, and
#: a failure would cost all of it): ``harvester.concurrency.SPREAD_MIN_SECONDS``
PER_INSTANCE_MIN_BYTES = 256 << 20
#: ... and a series of at least this size when connections are spare (the few series left would
#: leave connections idle as one ZIP each); below it a series takes a few round trips either way
PER_INSTANCE_SPARE_MIN_BYTES = 1 << 20


SOURCES = ("nbia", "dicomweb", "idc", "auto")  # auto: NBIA's plan, each series from IDC when it has it
#: IDC's public buckets (us-east-1; anonymous reads). The GCS mirror answers the same S3 calls at
#: https://storage.googleapis.com (``--endpoint-url``).
IDC_ENDPOINT_URL = "https://s3.amazonaws.com"


#: the environment variable naming the archive (``--api-url``'s default; ``Config.from_env``)
ENV_API_URL = "HARVESTER_API_URL"


def too_many_entries(count: int | None, limit: int) -> str:
    """What a ZIP past ``Limits.max_entries`` is told: too many entries for the limit (neither cut
    short nor damaged), shared by the streaming sink (which stops at the first entry past the
    limit: ``count`` None) and ``verify_and_unpack``."""
    has = "more entries than" if count is None else f"{count:,} entries, more than"
    return f"ZIP has {has} the limit of {limit:,} per series (Limits.max_entries): too many to accept"


#: the hint that goes with ``too_many_entries``
TOO_MANY_ENTRIES_HINT = ("nothing of it was kept; a series really this large needs a larger limit "
                         "(Config(limits=Limits(max_entries=N)) in the Python API), else report it to the archive")


@dataclass(frozen=True)
class Config:
    api_url: str = DEFAULT_API_URL    # NBIA: base ending in the version; DICOMweb: the service root
    source: str = "nbia"              # one of SOURCES
    collection_attribute: str = "ClinicalTrialProtocolID"  # DICOMweb: the attribute holding the collection
    out_dir: Path = Path("harvest")
    # None: the layout DIR's harvest.json records, else descriptive (``operations.resume_layout``
    # decides it when the run opens DIR; the engine always sees a layout)
    layout: str | None = "descriptive"
    annotations: bool = False         # also fetch annotation files (a cart's includeAnnotation=true)
    # Series in flight: one connection each. Enough to fill a link of per-connection-capped
    # streams (24 x 4 MB/s covers 64 MB/s with headroom for the slots busy unpacking); the
    # adaptive limit lowers it when the archive pushes back.
    workers: int = 24
    connections: int = 48             # global HTTP connection limit (2 x workers, as --workers sets it)
    # NBIA: fetch a series instance by instance (getSingleImage, several at once, each kept
    # for a resume) instead of as one ZIP: "auto" for series of at least PER_INSTANCE_MIN_BYTES
    # that one connection is slow for (``ConnectionController.slow_for``: a large series' ZIP is
    # timed first when nothing was measured) or of PER_INSTANCE_SPARE_MIN_BYTES when connections
    # are spare, "always", or "never"; 2 x
    # instance_streams instances of one series in flight at most (each streamed into its file),
    # each on a connection of the controller's (``max_connections``)
    per_instance: str = "auto"
    instance_streams: int = 16
    # Connections moving bytes at once (ZIPs and instances), found by the connection controller
    # (``harvester.concurrency``): it starts at ``workers``, adds connections while the total
    # throughput grows, holds when it stops growing and halves on 429/503/timeouts; never more
    # than this (a polite ceiling per host for the public archive) nor than ``connections``.
    max_connections: int = 32
    plan_concurrency: int = 8         # metadata requests in flight while planning
    retries: int = 5                  # attempts per HTTP request
    series_retries: int = 3           # extra attempts per series after request-level retries
    connect_timeout: float = 30.0
    read_timeout: float = 120.0       # no byte for this long = a stall
    # A request (headers and body) must end within this many seconds: 6 h is a 100 GB series
    # at 5 MB/s. And a body must bring stall_min_bytes in every stall_window seconds (1 KB/s
    # averaged over a minute), or it is cut off: a server dribbling a byte a second never trips
    # read_timeout. None / 0 switches each rule off.
    request_deadline: float | None = 6 * 3600.0
    stall_window: float = 60.0
    stall_min_bytes: int = 60 * 1024
    max_retry_after: float = 300.0    # a longer Retry-After is not waited for: the series is retried later
    max_json_bytes: int = 256 << 20   # one JSON answer, decompressed (NLST's getSeries is tens of MB)
    cross_origin_redirects: bool = False  # follow an https redirect to another host (never to http)
    backoff_base: float = 1.0         # seconds; exponential with jitter
    backoff_max: float = 60.0
    max_rate: int | None = None       # bytes/s over all connections
    chunk_size: int = 1 << 20
    auth: AuthConfig | None = None    # NBIA OAuth password grant; for DICOMweb: HTTP basic (user, password)
    bearer_token: str | None = field(default=None, repr=False)  # a fixed bearer token (DICOMweb)
    limits: Limits = Limits()
    # A cart or UID list naming series the archive does not have (or refuses): False harvests the
    # rest and lists them as unavailable (exit 1); True refuses before downloading (exit 2).
    strict: bool = False
    # Add to a DIR harvested from another archive or with another layout (see
    # ``harvester.operations.check_same_harvest``); refused by default.
    force: bool = False
    # Refuse to start when DIR's free space is less than the plan still needs (``check_free_space``).
    space_check: bool = True
    progress: bool = True
    quiet: bool = False
    user_agent: str = "harvester/0.1"
    # IDC (``source: idc`` or ``auto``): the S3 endpoint of its buckets, and the index to plan from (None:
    # the ``idc-index-data`` package's parquet, the extra ``harvester[idc]``)
    endpoint_url: str = IDC_ENDPOINT_URL
    idc_index: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **changes: Any) -> Config:
        """A config for the archive the environment names, as the CLI reads it: ``$HARVESTER_API_URL``
        (``ENV_API_URL``) for ``api_url`` unless ``changes`` give one; ``env`` defaults to
        ``os.environ``. The one place the API reads the environment, and only when asked: a plain
        ``Config()`` is the public TCIA archive whatever the environment says. Credentials are
        never read from a fixed variable: give ``auth=AuthConfig(...)`` or ``bearer_token=`` (the
        CLI reads them from the variable ``--password-env``/``--token-env`` names)."""
        env = os.environ if env is None else env
        url = env.get(ENV_API_URL)
        if url and "api_url" not in changes:
            changes["api_url"] = url.rstrip("/")
        return cls(**changes)

    @property
    def uses_public_default(self) -> bool:
        return self.api_url.rstrip("/") == DEFAULT_API_URL
