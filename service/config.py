"""The one configuration object of the service: environment variables prefixed ``LESIONSERVE_``.

Built in :func:`service.app.create_app` (or the entry point), never at import time, and
validated there: a bad value stops the process at start with a one-line message instead of
failing on the first request.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_api_keys(text: str, source: str) -> dict[str, str]:
    """Parse ``id:key`` entries separated by commas or newlines (``#`` starts a comment line).

    Args:
        text: the entries.
        source: where they came from, for error messages (never echoes a key).

    Returns:
        key id -> key.
    """
    keys: dict[str, str] = {}
    entries = [e for line in text.splitlines() if not line.strip().startswith("#") for e in _split(line)]
    for n, entry in enumerate(entries, 1):
        key_id, sep, key = entry.partition(":")
        key_id, key = key_id.strip(), key.strip()
        if not sep or not key_id or not key:
            raise ValueError(f"{source}: entry {n} is not of the form id:key")
        if len(key) < 16:
            raise ValueError(f"{source}: key {key_id!r} is shorter than 16 characters")
        if key_id in keys:
            raise ValueError(f"{source}: key id {key_id!r} appears twice")
        keys[key_id] = key
    return keys


def check_ae_title(value: str) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash, not only spaces (PS3.5 VR AE)."""
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or not all(32 <= ord(c) < 127 for c in v):
        raise ValueError(f"AE title {value!r} is not 1-16 printable ASCII characters without a backslash")
    return v


def parse_destination(value: str) -> tuple[str, str, int]:
    """``AE_TITLE@host:port`` -> (AE title, host, port)."""
    aet, at, address = value.strip().partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"DICOM destination {value!r} is not of the form AE_TITLE@host:port")
    return check_ae_title(aet), host.strip("[]"), int(port)


def _otel(name: str) -> AliasChoices:
    """A field read from the standard variable ``name`` (no prefix), or given by field name (a flag)."""
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Service settings; each field is the env variable ``LESIONSERVE_<NAME>``."""

    # populate_by_name: the OTEL_* fields below are read under their standard names, and set by name from flags.
    model_config = SettingsConfigDict(
        env_prefix="LESIONSERVE_", case_sensitive=False, extra="ignore", populate_by_name=True
    )

    model_path: Path = Field(description="The exported .onnx file (with lesionserve metadata).")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    providers: str = Field(DEFAULT_PROVIDERS, description="ONNX Runtime providers in order of preference.")
    max_batch_size: int = Field(8, ge=1, le=64)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="How long a batch waits to fill.")
    queue_size: int = Field(64, ge=1, le=100_000, description="Images waiting for inference; full -> 503.")
    request_timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="Per-request deadline -> 504.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Whole request body, in bytes.")
    max_pixels: int = Field(50_000_000, ge=64, description="Width x height read from the image header.")
    # Unset: half the model's input side (130 px for the reference model's 260; 64 px for a 128 px model), so the
    # image is enlarged at most twice per side on its way to the model; follows the loaded model across a swap.
    min_image_side: int | None = Field(
        None, ge=1, le=4096,
        description="Shorter side in pixels below which an image is refused (422 image-too-small); unset: half the model's input side.",
    )  # fmt: skip
    intra_op_threads: int = Field(0, ge=0, le=256, description="0: all cores on CPU, 1 on CUDA.")
    decode_threads: int = Field(0, ge=0, le=64, description="0: min(4, cores).")
    decode_queue_size: int = Field(32, ge=0, le=10_000, description="Uploads waiting for a decode thread; full -> 503.")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, description="Request line + headers; more -> 400, connection closed."
    )
    # Slow and silent clients (docs/service.md, "Slow, silent and vanishing clients"): each one holds a
    # socket, a task and its bytes; these end them by rule instead of by starving everyone else.
    header_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="Request line + headers must arrive within this; else 408, closed."
    )
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="Whole body must arrive within this -> 408.")
    body_min_rate_bytes_s: int = Field(
        4096, ge=0, description="Average body rate below this after the grace period -> 408; 0 = no rate rule."
    )
    body_rate_grace_s: float = Field(5.0, ge=0.0, le=600.0, description="Seconds before the rate rule applies.")
    max_uploads: int = Field(512, ge=1, le=100_000, description="Bodies being read at once; more -> 503.")
    max_connections: int = Field(
        2048, ge=1, le=1_000_000, description="Open HTTP connections; more -> 503 and closed at once."
    )
    api_keys: str = Field("", description="Comma list of id:key; empty with no file = auth off.")
    api_keys_file: Path | None = None
    metrics_auth: bool | None = Field(None, description="/metrics needs a key; unset (auto): when API keys are on.")
    metrics_only_key_ids: str = Field(
        "", description="Comma list of key ids that may read /metrics only (scrapers): elsewhere 403."
    )
    shutdown_grace_s: float = Field(20.0, ge=0.0, le=3600.0)
    # Model swap while serving (service/swap/): SIGHUP, POST /v1/admin/models/reload, or the file watcher.
    admin_key_ids: str = Field(
        "", description="Comma list of key ids allowed to call /v1/admin/*; empty = admin API off."
    )
    models_dir: Path | None = Field(None, description="Folder a reload's path must be in; unset: MODEL_PATH's folder.")
    model_watch: bool = Field(False, description="Reload when MODEL_PATH is replaced by an atomic rename.")
    model_watch_interval_s: float = Field(2.0, ge=0.1, le=3600.0, description="How often the watcher stats the file.")
    # HTTPS in the server itself (docs/service.md, "TLS"); both files or neither. Reloaded on SIGHUP.
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve HTTPS instead of HTTP.")
    tls_key_file: Path | None = Field(None, description="PEM private key of TLS_CERT_FILE (unencrypted, 0600).")
    tls_client_ca_file: Path | None = Field(None, description="PEM CAs whose client certificates are accepted.")
    tls_client_cert: Literal["none", "optional", "required"] = Field(
        "none", description="Client certificates: none, optional (verified if sent), required (mutual TLS)."
    )
    # Tracing (service/tracing.py): the standard OpenTelemetry variables, without the LESIONSERVE_ prefix. Only those
    # that decide whether and where spans go are read here; the SDK reads the rest (OTEL_EXPORTER_OTLP_HEADERS,
    # OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_RESOURCE_ATTRIBUTES) itself.
    otel_sdk_disabled: bool = Field(False, validation_alias=_otel("OTEL_SDK_DISABLED"), description="true: no spans.")
    otel_traces_exporter: str = Field(
        "", validation_alias=_otel("OTEL_TRACES_EXPORTER"),
        description="otlp, console (comma list) or none; unset: otlp when an OTLP endpoint is set, else no tracing.",
    )  # fmt: skip
    otel_exporter_otlp_endpoint: str = Field("", validation_alias=_otel("OTEL_EXPORTER_OTLP_ENDPOINT"))
    otel_exporter_otlp_traces_endpoint: str = Field("", validation_alias=_otel("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    otel_exporter_otlp_protocol: str = Field("", validation_alias=_otel("OTEL_EXPORTER_OTLP_PROTOCOL"))
    otel_exporter_otlp_traces_protocol: str = Field("", validation_alias=_otel("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
    otel_service_name: str = Field("", validation_alias=_otel("OTEL_SERVICE_NAME"), description="Default: lesionserve.")
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    pad_batches: Literal["auto", "on", "off"] = "auto"
    cuda_mem_limit_mb: int = Field(0, ge=0, description="CUDA arena limit; 0 = no limit.")
    malignancy_threshold: float | None = Field(None, ge=0.0, le=1.0, description="Overrides the model's.")
    ood_policy: Literal["flag", "reject"] = Field(
        "flag",
        description="Out-of-distribution image: flag the answer, or reject it with 422 (needs a model with ood_score).",
    )
    served_model_name: str = Field(
        "", description="Model name of the /v2 (Open Inference Protocol) paths; empty: the model's own name."
    )
    ui: bool = Field(True, description="Serve the page at / (false: / is 404; the API is unchanged).")
    audit_log: str = Field("-", description="Audit trail: '-' stderr, a file path to append to, or 'off'.")
    audit_uid_key: SecretStr | None = Field(None, description="HMAC key for DICOM UIDs in the audit trail.")
    audit_on_failure: Literal["open", "closed"] = Field(
        "open", description="An audit line not written: open = keep answering (counted, alerted); closed = 503."
    )
    # PACS entries (docs/integration.md, "PACS round trip"); all off by default.
    dimse_enabled: bool = Field(False, description="Run the DICOM Storage SCP (C-STORE in, SR back) in this process.")
    dimse_ae_title: str = Field("LESIONSERVE", description="The SCP's own AE title (called AE title).")
    dimse_host: str = Field("0.0.0.0", description="Address the Storage SCP listens on.")
    dimse_port: int = Field(11112, ge=1, le=65535, description="DICOM port of the Storage SCP.")
    dimse_allowed_aets: str = Field("", description="Comma list of calling AE titles allowed to associate.")
    dimse_destination: str = Field("", description="Where SRs go by C-STORE: AE_TITLE@host:port.")
    dimse_max_associations: int = Field(8, ge=1, le=256, description="Associations open at once; more are rejected.")
    dimse_timeout_s: float = Field(30.0, gt=0.0, le=600.0, description="Network/ACSE/DIMSE timeouts, both directions.")
    # DICOM TLS (PS3.15 B.1, docs/service.md "TLS"): the SCP listens with TLS when both files are set.
    dimse_tls_cert_file: Path | None = Field(None, description="PEM certificate of the SCP (and of the SR sender).")
    dimse_tls_key_file: Path | None = Field(None, description="PEM private key of DIMSE_TLS_CERT_FILE.")
    dimse_tls_ca_file: Path | None = Field(None, description="PEM CAs: senders' client certificates, the PACS's.")
    dimse_tls_client_cert: Literal["none", "optional", "required"] = Field(
        "required", description="Senders' certificates at the TLS SCP: none, optional, required."
    )
    dimse_destination_tls: bool = Field(False, description="Send SRs to DIMSE_DESTINATION over TLS.")
    # Before the AE check a connection holds no association slot (docs/security.md, "DIMSE"): these bound
    # what anyone who can reach the port may hold without an allowed AE title.
    dimse_max_connections: int = Field(
        64, ge=1, le=4096, description="TCP connections open at once (any peer); more are closed at once."
    )
    dimse_request_timeout_s: float = Field(
        5.0, gt=0.0, le=600.0, description="A connection must send its A-ASSOCIATE-RQ within this; else closed."
    )
    dicomweb_enabled: bool = Field(False, description="Serve POST /dicomweb/studies and /v1/classify/dicomweb.")
    dicomweb_origin: str = Field("", description="DICOMweb base URL of the PACS (WADO-RS source, STOW-RS target).")
    dicomweb_origin_auth: SecretStr | None = Field(None, description="user:password for the origin (HTTP Basic).")
    dicomweb_push_sr: bool = Field(False, description="STOW-RS input: store each SR at the origin.")
    dicomweb_fetch_slots: int = Field(
        8, ge=1, le=256, description="WADO-RS fetches from the origin at once (own threads); more -> 503."
    )
    stow_max_parts: int = Field(1000, ge=1, le=100_000, description="Parts in one STOW-RS request; more -> 413.")
    # The SR outbox (docs/integration.md, "The result outbox"): every SR for a C-STORE or STOW-RS is written here
    # before the sender hears success, then delivered with retries. The file holds patient data (the SRs).
    outbox_path: Path | None = Field(
        None, description="SQLite file of the SR outbox (created 0600); required with DIMSE or DICOMWEB_PUSH_SR."
    )
    outbox_max_items: int = Field(
        10_000, ge=1, le=10_000_000, description="SRs held (pending + dead); more -> A700/503."
    )
    outbox_max_bytes: int = Field(
        512 * 1024 * 1024, ge=64 * 1024, description="Bytes of SRs held (pending + dead); more -> A700/503."
    )
    outbox_retry_base_s: float = Field(2.0, gt=0.0, le=3600.0, description="First retry delay; doubles per attempt.")
    outbox_retry_max_s: float = Field(300.0, gt=0.0, le=86400.0, description="Longest delay between two attempts.")
    outbox_max_attempts: int = Field(1000, ge=1, le=1_000_000, description="Failed attempts before a dead letter.")
    outbox_max_age_s: float = Field(
        48 * 3600.0, gt=0.0, le=90 * 86400.0, description="An SR not delivered by this age becomes a dead letter."
    )
    outbox_retention_s: float = Field(
        0.0, ge=0.0, le=90 * 86400.0, description="How long a delivered SR stays in the file; 0: deleted at delivery."
    )

    @field_validator("metrics_auth", mode="before")
    @classmethod
    def _auto(cls, v: object) -> object:
        return None if isinstance(v, str) and v.strip().lower() in ("", "auto") else v

    @field_validator("audit_log")
    @classmethod
    def _audit_destination(cls, v: str) -> str:
        if v not in ("-", "off") and not Path(v).parent.is_dir():
            raise ValueError(f"audit log folder {Path(v).parent} does not exist")
        if v not in ("-", "off"):
            try:  # opened as the service will (append, created if absent): refused at start in one line, exit 2
                with open(v, "a", encoding="utf-8"):
                    pass
            except OSError as exc:
                raise ValueError(f"cannot open the audit log {v}: {exc.strerror or type(exc).__name__}") from None
        return v

    @field_validator("model_path")
    @classmethod
    def _model_exists(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"model file {v} does not exist")
        return v

    @field_validator("models_dir")
    @classmethod
    def _models_dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"models folder {v} does not exist")
        return v

    @field_validator("providers")
    @classmethod
    def _providers_listed(cls, v: str) -> str:
        if not _split(v):
            raise ValueError("at least one execution provider is needed")
        return v

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        if v.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return v.upper()

    @field_validator("dimse_ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        return check_ae_title(v)

    @model_validator(mode="after")
    def _pacs(self) -> Settings:
        aets = self.dimse_allowed_ae_list  # each checked
        if self.dimse_enabled and not aets:  # a Storage SCP open to any AE title is never what a hospital wants
            raise ValueError("LESIONSERVE_DIMSE_ENABLED=true needs LESIONSERVE_DIMSE_ALLOWED_AETS (calling AE titles)")
        if self.dimse_enabled and not self.dimse_destination.strip():
            raise ValueError("LESIONSERVE_DIMSE_ENABLED=true needs LESIONSERVE_DIMSE_DESTINATION (AE_TITLE@host:port)")
        if self.dimse_destination.strip():
            parse_destination(self.dimse_destination)
        origin = self.dicomweb_origin.strip()
        if origin and not origin.startswith(("http://", "https://")):
            raise ValueError("LESIONSERVE_DICOMWEB_ORIGIN must be an http(s) URL, e.g. http://pacs:8042/dicom-web")
        if self.dicomweb_push_sr and not origin:
            raise ValueError("LESIONSERVE_DICOMWEB_PUSH_SR=true needs LESIONSERVE_DICOMWEB_ORIGIN")
        if self.outbox_enabled and self.outbox_path is None:  # an SR answered as success must be somewhere durable
            raise ValueError(
                "LESIONSERVE_DIMSE_ENABLED or LESIONSERVE_DICOMWEB_PUSH_SR needs LESIONSERVE_OUTBOX_PATH (the SR outbox)"
            )
        if self.outbox_path is not None and not self.outbox_path.parent.is_dir():
            raise ValueError(f"LESIONSERVE_OUTBOX_PATH: folder {self.outbox_path.parent} does not exist")
        if self.outbox_retry_max_s < self.outbox_retry_base_s:
            raise ValueError("LESIONSERVE_OUTBOX_RETRY_MAX_S is shorter than LESIONSERVE_OUTBOX_RETRY_BASE_S")
        return self

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        # Each rule refuses a configuration that would look secured but is not, or would fail at the first handshake.
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("LESIONSERVE_TLS_CERT_FILE and LESIONSERVE_TLS_KEY_FILE go together: set both or neither")
        if self.tls_client_cert != "none" and self.tls_cert_file is None:
            raise ValueError("LESIONSERVE_TLS_CLIENT_CERT needs HTTPS (LESIONSERVE_TLS_CERT_FILE and _KEY_FILE)")
        if self.tls_client_cert != "none" and self.tls_client_ca_file is None:
            raise ValueError(f"LESIONSERVE_TLS_CLIENT_CERT={self.tls_client_cert} needs LESIONSERVE_TLS_CLIENT_CA_FILE")
        if self.tls_client_ca_file is not None and self.tls_client_cert == "none":
            raise ValueError("LESIONSERVE_TLS_CLIENT_CA_FILE is set but LESIONSERVE_TLS_CLIENT_CERT is none")
        if (self.dimse_tls_cert_file is None) != (self.dimse_tls_key_file is None):
            raise ValueError("LESIONSERVE_DIMSE_TLS_CERT_FILE and LESIONSERVE_DIMSE_TLS_KEY_FILE go together")
        dimse_tls = self.dimse_tls_cert_file is not None
        if dimse_tls and self.dimse_tls_client_cert != "none" and self.dimse_tls_ca_file is None:
            raise ValueError(
                f"LESIONSERVE_DIMSE_TLS_CLIENT_CERT={self.dimse_tls_client_cert} needs LESIONSERVE_DIMSE_TLS_CA_FILE"
            )
        if self.dimse_destination_tls and self.dimse_tls_ca_file is None:  # a PACS certificate nobody checks
            raise ValueError("LESIONSERVE_DIMSE_DESTINATION_TLS=true needs LESIONSERVE_DIMSE_TLS_CA_FILE")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "dimse_tls_cert_file",
                     "dimse_tls_key_file", "dimse_tls_ca_file"):  # fmt: skip
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"LESIONSERVE_{name.upper()}: {path} is not a file")
        return self

    @model_validator(mode="after")
    def _otel_values(self) -> Settings:
        exporters = {n.strip() for n in self.otel_traces_exporter.split(",") if n.strip()}
        unknown = sorted(exporters - {"otlp", "console", "none"})
        if unknown:
            raise ValueError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not otlp, console or none")
        if "none" in exporters and len(exporters) > 1:
            raise ValueError("OTEL_TRACES_EXPORTER: none cannot be combined with an exporter")
        for name in ("otel_exporter_otlp_protocol", "otel_exporter_otlp_traces_protocol"):
            value = getattr(self, name).strip()
            if value and value != "http/protobuf":  # the one OTLP exporter the serve extra installs
                raise ValueError(f"{name.upper()}: {value} is not supported; use http/protobuf")
        return self

    @property
    def outbox_enabled(self) -> bool:
        """Whether SRs go to a PACS (C-STORE back, or STOW-RS back): then through the outbox."""
        return self.dimse_enabled or self.dicomweb_push_sr

    @property
    def dimse_allowed_ae_list(self) -> list[str]:
        return [check_ae_title(a) for a in _split(self.dimse_allowed_aets)]

    @model_validator(mode="after")
    def _keys_parse(self) -> Settings:
        keys = self.key_table()  # refuse malformed keys at start, not on the first request
        unknown = sorted(set(self.metrics_only_ids) - set(keys))
        if unknown:
            raise ValueError(f"metrics_only_key_ids names keys that do not exist: {', '.join(unknown)}")
        unknown = sorted(self.admin_ids - set(keys))
        if unknown:  # an admin id without its key would leave the admin API open to no one, silently
            raise ValueError(f"admin_key_ids names keys that do not exist: {', '.join(unknown)}")
        if self.admin_ids & self.metrics_only_ids:
            raise ValueError("a key id cannot be both in admin_key_ids and in metrics_only_key_ids")
        if self.metrics_auth and not keys:  # it would serve /metrics to anyone while saying it does not
            raise ValueError(
                "LESIONSERVE_METRICS_AUTH=true needs API keys (LESIONSERVE_API_KEYS or LESIONSERVE_API_KEYS_FILE)"
            )
        return self

    def metrics_key_required(self, keys_on: bool) -> bool:
        """Whether /metrics wants a key: METRICS_AUTH if set, else whenever API keys are on."""
        return self.metrics_auth if self.metrics_auth is not None else keys_on

    @property
    def metrics_only_ids(self) -> set[str]:
        return set(_split(self.metrics_only_key_ids))

    @property
    def admin_ids(self) -> set[str]:
        return set(_split(self.admin_key_ids))

    @property
    def allowed_models_dir(self) -> Path:
        """The folder a reload may take a model from (resolved: symlinks cannot lead out of it)."""
        return (self.models_dir or self.model_path.parent).resolve()

    @property
    def provider_list(self) -> list[str]:
        return _split(self.providers)

    def key_table(self) -> dict[str, str]:
        """API keys from ``API_KEYS`` and ``API_KEYS_FILE`` merged; empty means auth is off."""
        keys = parse_api_keys(self.api_keys, "LESIONSERVE_API_KEYS")
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read api_keys_file {self.api_keys_file}: {exc.strerror}") from None
            for key_id, key in parse_api_keys(text, str(self.api_keys_file)).items():
                if key_id in keys:
                    raise ValueError(f"key id {key_id!r} is in both LESIONSERVE_API_KEYS and the keys file")
                keys[key_id] = key
        return keys

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or min(4, os.cpu_count() or 1)

    def resolved_intra_op_threads(self, provider: str) -> int:
        if self.intra_op_threads:
            return self.intra_op_threads
        # On CUDA the CPU threads only feed the GPU; on CPU they are the compute.
        return 1 if provider == "CUDAExecutionProvider" else (os.cpu_count() or 1)

    def pad_enabled(self, provider: str) -> bool:
        # Padding to a few fixed batch shapes saves per-shape cuDNN tuning on CUDA; on CPU it
        # only adds wasted rows, so "auto" pads on CUDA alone.
        return self.pad_batches == "on" or (self.pad_batches == "auto" and provider == "CUDAExecutionProvider")


class ClientSettings(BaseSettings):
    """Settings of the client commands (``lesionserve classify``, ``models``, ``health``): the one config object
    of a client process, from flags over ``LESIONSERVE_*`` over these defaults."""

    model_config = SettingsConfigDict(env_prefix="LESIONSERVE_", case_sensitive=False, extra="ignore")

    url: str = Field("http://127.0.0.1:8000", description="The lesionserve server's base URL.")
    api_key: SecretStr | None = Field(None, description="API key sent as 'Authorization: Bearer KEY'.")
    concurrency: int = Field(8, ge=1, le=256, description="Images in flight at once.")
    retries: int = Field(
        5, ge=0, le=100, description="Retries of one image on 503 (after Retry-After) or no connection."
    )
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Per-request timeout of the client.")
    # HTTPS to a server with a certificate from the hospital's CA, or one that wants a client certificate (mutual TLS).
    ca_file: Path | None = Field(
        None, description="PEM CAs that sign the server's certificate (default: the system's)."
    )
    client_cert_file: Path | None = Field(None, description="PEM client certificate, for a server with mutual TLS.")
    client_key_file: Path | None = Field(None, description="PEM key of CLIENT_CERT_FILE (unencrypted).")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"URL {v!r} must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _tls_files(self) -> ClientSettings:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("LESIONSERVE_CLIENT_CERT_FILE and LESIONSERVE_CLIENT_KEY_FILE go together")
        self.ssl_context()  # a file that cannot be used is refused now, in one line, not at the first request
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the client's requests: CA_FILE and the client certificate (None: httpx's default)."""
        if self.ca_file is None and self.client_cert_file is None:
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.client_cert_file is not None and self.client_key_file is not None:
                ctx.load_cert_chain(self.client_cert_file, self.client_key_file, password=lambda: "")
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
            raise ValueError(f"the TLS files cannot be used ({reason})") from None
        return ctx


def describe_validation_error(exc: Exception) -> str:
    """One line for a settings error: ``LESIONSERVE_FIELD: message; ...`` (no traceback)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    parts = []
    for err in errors():
        loc = "_".join(str(p) for p in err.get("loc", ()))
        name = loc.upper() if loc.upper().startswith("OTEL_") else f"LESIONSERVE_{loc.upper()}" if loc else "settings"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{name}: {msg}")
    return "; ".join(parts)
