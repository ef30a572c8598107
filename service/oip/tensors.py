"""The OIP v2 wire format: an inference request in, an inference response out (pure functions, no I/O).

A request body is a JSON header, optionally followed by raw tensor bytes (the binary tensor extension:
``Inference-Header-Content-Length`` gives the JSON's length, each binary input names its byte count in
``parameters.binary_data_size``). lesionserve takes one BYTES input of shape ``[N]``: N encoded images.
In binary form each element is a 4-byte little-endian length then the bytes (Triton's serialisation);
in JSON form each element is the image's base64 text (JSON strings cannot carry raw bytes), as KServe's
and MLServer's image examples send them.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BadRequest

INPUT = "image"
DATATYPES = {np.dtype(np.float32): "FP32"}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InferRequest:
    """What lesionserve needs from a request: the images, the outputs asked for and how to send them."""

    images: list[bytes]
    request_id: str | None = None
    outputs: list[str] | None = None  # None: every output
    binary: set[str] = field(default_factory=set)  # outputs to send as raw bytes after the JSON


def _json(data: bytes) -> dict[str, Any]:
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the inference request header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request header must be a JSON object")
    return header


def split_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialisation (each element: uint32 little-endian length, then its bytes) -> elements."""
    out: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest(f"BYTES element {len(out)}: its 4-byte length is cut off")
        (n,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + n > len(raw):
            raise BadRequest(f"BYTES element {len(out)}: {n} bytes announced, {len(raw) - at} left")
        out.append(raw[at : at + n])
        at += n
    return out


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _b64(value: object, n: int) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"BYTES element {n}: in JSON form each image is a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"BYTES element {n}: not valid base64") from None


def parse_request(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """Read an inference request (JSON, or JSON + binary tensors).

    Args:
        body: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` header (None: the body is all JSON).
        max_images: the most images one request may carry.

    Raises:
        BadRequest: anything malformed, with what and where (400 ``{"error": ...}``).
    """
    if header_length is None:
        header, rest = _json(body), b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body")
        n = int(header_length)
        header, rest = _json(body[:n]), body[n:]
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"exactly one input is expected: {INPUT!r}, BYTES, shape [N] (N encoded images)")
    tensor = inputs[0]
    if tensor.get("name") != INPUT or tensor.get("datatype") != "BYTES":
        raise BadRequest(f"the input must be named {INPUT!r} with datatype BYTES, not {tensor.get('name')!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise BadRequest(f"input {INPUT!r} must have shape [N] with N >= 1, not {shape!r}")
    count = shape[0]
    if count > max_images:
        raise BadRequest(f"{count} images in one request; at most {max_images} (LESIONSERVE_QUEUE_SIZE)")
    params = tensor.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(rest):
            raise BadRequest(f"binary_data_size {size!r} does not match the {len(rest)} bytes after the header")
        images = split_bytes(rest)
    else:
        if rest:
            raise BadRequest("bytes follow the JSON header but no input declares binary_data_size")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest(f"input {INPUT!r} has neither 'data' nor parameters.binary_data_size")
        images = [_b64(v, i) for i, v in enumerate(data)]
    if len(images) != count:
        raise BadRequest(f"input {INPUT!r} declares shape [{count}] but carries {len(images)} elements")
    return InferRequest(images, *_outputs(header))


def _outputs(header: dict[str, Any]) -> tuple[str | None, list[str] | None, set[str]]:
    request_id = header.get("id")
    params = header.get("parameters") or {}
    binary_all = bool(params.get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        return (str(request_id) if request_id is not None else None), None, ({"*"} if binary_all else set())
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    names = [o["name"] for o in asked]
    binary = {o["name"] for o in asked if (o.get("parameters") or {}).get("binary_data", binary_all)}
    return (str(request_id) if request_id is not None else None), names, binary


def encode_response(
    head: dict[str, Any], tensors: dict[str, np.ndarray | list[str]], binary: set[str]
) -> tuple[bytes, int | None]:
    """The response body and, when any tensor goes as raw bytes, the JSON header's length.

    Args:
        head: ``model_name``, ``model_version``, ``id``.
        tensors: output name -> FP32 array or a list of strings (BYTES), in the order to send.
        binary: names to send in binary form (``"*"``: all).
    """
    outputs, blobs = [], []
    for name, value in tensors.items():
        out: dict[str, Any] = {"name": name}
        if isinstance(value, np.ndarray):
            out.update(datatype=DATATYPES[value.dtype], shape=list(value.shape))
            raw, as_json = value.tobytes(), value.reshape(-1).tolist()
        else:
            out.update(datatype="BYTES", shape=[len(value)])
            raw, as_json = join_bytes([v.encode() for v in value]), list(value)
        if name in binary or "*" in binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = as_json
        outputs.append(out)
    header = json.dumps({**head, "outputs": outputs}, allow_nan=True).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
