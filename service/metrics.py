"""Prometheus metrics: every metric is a module-level constant named ``lesionserve_<noun>_<verb>_<unit>``.

These names are a contract with ``deploy/`` (Grafana dashboard, alert rules): renaming one
breaks operators' dashboards, so add new metrics rather than rename.
Labels hold route templates (``/v1/classify``), never raw paths, and label values come from
closed sets so the number of series stays bounded.
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram, Info


class RejectReason(StrEnum):
    """Why a request was refused before or instead of inference (``reason`` label)."""

    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    TOO_LARGE = "too_large"
    UNSUPPORTED_TYPE = "unsupported_type"
    UNDECODABLE = "undecodable"
    TOO_SMALL = "too_small"  # shorter side under LESIONSERVE_MIN_IMAGE_SIDE
    UNAUTHORIZED = "unauthorized"
    NOT_READY = "not_ready"
    SHUTTING_DOWN = "shutting_down"
    OUT_OF_DISTRIBUTION = "out_of_distribution"
    UPLOAD_TIMEOUT = "upload_timeout"
    UPLOAD_TOO_SLOW = "upload_too_slow"
    TOO_MANY_UPLOADS = "too_many_uploads"
    OUTBOX_FULL = "outbox_full"  # the SR outbox is at its cap (PACS entries only)
    OUTBOX_UNAVAILABLE = "outbox_unavailable"  # the SR outbox file cannot be written (disk full, read-only)
    # Refused at the connection, before any request (so never in lesionserve_requests_total).
    HEADER_TIMEOUT = "header_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"


class DisconnectStage(StrEnum):
    """Where a client was when it closed the connection before its answer (``stage`` label)."""

    UPLOAD = "upload"  # while its body was being read
    PROCESSING = "processing"  # body read; decoding, queued or in inference


class SkipReason(StrEnum):
    """Why the batcher dropped a queued image without running it (``reason`` label)."""

    CLIENT_CLOSED = "client_closed"
    DEADLINE = "deadline"


class Method(StrEnum):
    """The ``method`` label: the standard methods, everything else ``other`` (a client chooses the method)."""

    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    PATCH = "PATCH"
    OPTIONS = "OPTIONS"
    OTHER = "other"

    @classmethod
    def of(cls, method: str) -> Method:
        return cls._value2member_map_.get(method, cls.OTHER)  # type: ignore[return-value]


# Latency buckets: CPU inference of a ResNet-50 is ~50-500 ms, GPU ~2-20 ms; requests that
# wait in a saturated queue go to seconds. Fine steps below 100 ms, coarse above.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
# Queue waits are bounded by max_wait_ms (a few ms) unless the model is saturated.
QUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Batch sizes are small integers: one bucket per power of two up to the largest max_batch we allow.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

REQUESTS_TOTAL = Counter(
    "lesionserve_requests_total",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
)
REQUEST_DURATION_SECONDS = Histogram(
    "lesionserve_request_duration_seconds",
    "Wall time from request start to response",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT_REQUESTS = Gauge("lesionserve_in_flight_requests", "HTTP requests being handled now")
DECODE_DURATION_SECONDS = Histogram(
    "lesionserve_decode_duration_seconds", "Image decode + crop + resize time", buckets=LATENCY_BUCKETS
)
QUEUE_WAIT_SECONDS = Histogram(
    "lesionserve_queue_wait_seconds",
    "Time an image waited in the batcher queue before its batch ran",
    buckets=QUEUE_BUCKETS,
)
INFERENCE_DURATION_SECONDS = Histogram(
    "lesionserve_inference_duration_seconds", "ONNX Runtime run time per batch", buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram("lesionserve_batch_size", "Images per inference batch (before padding)", buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("lesionserve_queue_depth", "Images waiting in the batcher queue")
QUEUE_CAPACITY = Gauge("lesionserve_queue_capacity", "Maximum images the batcher queue holds")
REJECTIONS_TOTAL = Counter("lesionserve_rejections_total", "Requests refused, by reason", ["reason"])
INFERENCE_ERRORS_TOTAL = Counter("lesionserve_inference_errors_total", "Inference batches that failed")
PREDICTIONS_TOTAL = Counter("lesionserve_predictions_total", "Top-1 predictions, by class code", ["class_code"])
MALIGNANCY_FLAGGED_TOTAL = Counter(
    "lesionserve_malignancy_flagged_total", "Predictions whose malignancy score reached the threshold"
)
# Drift signal: the share flagged is ~5% on in-distribution images (the threshold's pass rate); more means
# other images are arriving (another camera, clinical photos, wrong modality). Both count only models with
# an ood_score output, so their ratio is meaningful.
OOD_CHECKED_TOTAL = Counter("lesionserve_ood_checked_total", "Images whose out-of-distribution score was computed")
OOD_FLAGGED_TOTAL = Counter(
    "lesionserve_ood_flagged_total", "Images whose out-of-distribution score passed the model's threshold"
)
CLIENT_DISCONNECTS_TOTAL = Counter(
    "lesionserve_client_disconnects_total",
    "Requests whose client closed the connection before the answer (status 499), by stage",
    ["stage"],
)
INFERENCE_SKIPPED_TOTAL = Counter(
    "lesionserve_inference_skipped_total",
    "Queued images dropped before inference because nobody waits for them any more, by reason",
    ["reason"],
)
UPLOADS_READING = Gauge("lesionserve_uploads_reading", "Request bodies being read now")
OPEN_CONNECTIONS = Gauge("lesionserve_open_connections", "HTTP connections open now")
READY = Gauge("lesionserve_ready", "1 when the model is loaded and warmed up, else 0")
MODEL_INFO = Info("lesionserve_model", "Loaded model: name, version, sha256 and the execution provider in use")
# The model's identity lives in this one info series, not as labels on every series: a swap would otherwise
# start a new set of every histogram bucket per model and break the alert rules' sums. Dashboards join it:
# `... * on (instance) group_left (version, sha256) lesionserve_model_info` (deploy/grafana).
MODEL_LOADED_TIMESTAMP_SECONDS = Gauge(
    "lesionserve_model_loaded_timestamp_seconds", "Unix time the serving model started taking traffic (start or swap)"
)


class ReloadResult(StrEnum):
    """``result`` of a model reload (service.swap): done, nothing to do, or the check that refused the file."""

    SUCCESS = "success"
    UNCHANGED = "unchanged"  # the same sha256 as the serving model
    PATH = "path"
    LOAD = "load"
    CONTRACT = "contract"
    WARM_UP = "warm_up"
    CANARY = "canary"


MODEL_RELOADS_TOTAL = Counter(
    "lesionserve_model_reloads_total", "Model reloads, by result (success, unchanged, or the failed check)", ["result"]
)
for _result in ReloadResult:
    MODEL_RELOADS_TOTAL.labels(result=_result.value)

for _reason in RejectReason:
    REJECTIONS_TOTAL.labels(reason=_reason.value)  # export zeros up front so rate() works from the start
for _stage in DisconnectStage:
    CLIENT_DISCONNECTS_TOTAL.labels(stage=_stage.value)
for _skip in SkipReason:
    INFERENCE_SKIPPED_TOTAL.labels(reason=_skip.value)


# --- PACS entries (service/hospital/): DIMSE, STOW-RS, WADO-RS ------------------------------------
class PacsEntry(StrEnum):
    """How a DICOM instance arrived (``entry`` label)."""

    DIMSE = "dimse"
    STOW_RS = "stow-rs"
    WADO_RS = "wado-rs"


class InstanceOutcome(StrEnum):
    """``outcome`` of one received instance: classified, refused (the sender's object), failed (ours)."""

    CLASSIFIED = "classified"
    REFUSED = "refused"
    FAILED = "failed"


class AssociationOutcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # calling or called AE title not allowed, too many associations
    ABORTED = "aborted"


class SrOutcome(StrEnum):
    STORED = "stored"
    FAILED = "failed"


DIMSE_ASSOCIATIONS_TOTAL = Counter(
    "lesionserve_dimse_associations_total", "DICOM associations requested of the Storage SCP, by outcome", ["outcome"]
)
DIMSE_ACTIVE_ASSOCIATIONS = Gauge("lesionserve_dimse_active_associations", "DICOM associations open now")
DIMSE_CONTEXTS_REFUSED_TOTAL = Counter(
    "lesionserve_dimse_contexts_refused_total", "Presentation contexts refused (SOP class or transfer syntax)"
)
DICOM_INSTANCES_TOTAL = Counter(
    "lesionserve_dicom_instances_total", "DICOM instances received by a PACS entry, by outcome", ["entry", "outcome"]
)
SR_DELIVERIES_TOTAL = Counter(
    "lesionserve_sr_deliveries_total",
    "DICOM SR results sent back to the PACS, by entry and outcome",
    ["entry", "outcome"],
)
for _a in AssociationOutcome:
    DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=_a.value)
for _e in PacsEntry:
    for _o in InstanceOutcome:
        DICOM_INSTANCES_TOTAL.labels(entry=_e.value, outcome=_o.value)
    for _s in SrOutcome:
        SR_DELIVERIES_TOTAL.labels(entry=_e.value, outcome=_s.value)


# --- the SR outbox (service/hospital/outbox.py, delivery.py): results waiting for the PACS ----------------
class DeadReason(StrEnum):
    """Why an SR was given up on and kept as a dead letter (``reason`` label)."""

    REFUSED = "refused"  # the PACS refused it for good (SR class not accepted, Cannot Understand, 4xx)
    ATTEMPTS = "attempts"  # OUTBOX_MAX_ATTEMPTS failed attempts
    AGE = "age"  # older than OUTBOX_MAX_AGE_S


# From a local PACS answering in tens of milliseconds to one down for a patch night (hours) or a weekend.
OUTBOX_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
AUDIT_WRITE_FAILURES_TOTAL = Counter(
    "lesionserve_audit_write_failures_total", "Audit lines that could not be written (kept in memory, retried)"
)
OUTBOX_PENDING = Gauge("lesionserve_outbox_pending", "SRs in the outbox waiting for delivery to the PACS")
OUTBOX_DEAD_LETTERS = Gauge("lesionserve_outbox_dead_letters", "SRs given up on, kept for an operator (admin API)")
OUTBOX_BYTES = Gauge("lesionserve_outbox_bytes", "Bytes of SRs held in the outbox (pending and dead letters)")
OUTBOX_OLDEST_PENDING_AGE_SECONDS = Gauge(
    "lesionserve_outbox_oldest_pending_age_seconds", "Age of the oldest SR waiting for delivery; 0 when none waits"
)
OUTBOX_DELIVERED_TOTAL = Counter(
    "lesionserve_outbox_delivered_total", "SRs the PACS stored, from the outbox, by destination", ["destination"]
)
OUTBOX_RETRIES_TOTAL = Counter(
    "lesionserve_outbox_retries_total", "Failed delivery attempts that will be retried, by destination", ["destination"]
)
OUTBOX_DEAD_LETTERED_TOTAL = Counter(
    "lesionserve_outbox_dead_lettered_total", "SRs moved to the dead letters, by reason", ["reason"]
)
OUTBOX_DELIVERY_LATENCY_SECONDS = Histogram(
    "lesionserve_outbox_delivery_latency_seconds",
    "From the SR's write to the outbox to the PACS storing it",
    buckets=OUTBOX_LATENCY_BUCKETS,
)
for _d in (PacsEntry.DIMSE, PacsEntry.STOW_RS):
    OUTBOX_DELIVERED_TOTAL.labels(destination=_d.value)
    OUTBOX_RETRIES_TOTAL.labels(destination=_d.value)
for _r in DeadReason:
    OUTBOX_DEAD_LETTERED_TOTAL.labels(reason=_r.value)
