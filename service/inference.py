"""The ONNX Runtime session behind a small interface: ``run(batch uint8 [N,S,S,3]) -> [N,K]``.

The model is read through the contract (:class:`service.contract.ModelMetadata`); a file
without the metadata is refused here, before the server starts.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from service.contract import CAM_OUTPUT, INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME, MetadataError, ModelMetadata

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"


class ModelLoadError(RuntimeError):
    """The model file cannot be served; the message is one line for the operator."""


class InferenceModel(Protocol):
    """What the batcher and the routes need from a model (a fake one implements it in tests)."""

    metadata: ModelMetadata
    provider: str
    sha256: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class MultiOutputModel(InferenceModel, Protocol):
    """A model that also gives its optional outputs (``ood_score``, ``cam``) when it has them."""

    def run_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def choose_providers(wanted: list[str], available: list[str]) -> list[str]:
    """The wanted providers that this onnxruntime build has, in the wanted order.

    Raises:
        ModelLoadError: none of them is available.
    """
    usable = [p for p in wanted if p in available]
    if not usable:
        raise ModelLoadError(f"none of the providers {wanted} is available (this onnxruntime has {available})")
    skipped = [p for p in wanted if p not in available]
    if skipped:  # expected on CPU nodes; the provider in use is logged at load and exported as a metric
        log.debug("execution providers not available, skipped", extra={"skipped": skipped})
    return usable


def provider_options(provider: str, cuda_mem_limit_mb: int) -> dict[str, Any]:
    if provider != CUDA:
        return {}
    # HEURISTIC cuDNN algorithm choice avoids the seconds-long EXHAUSTIVE search on the first
    # call of every new shape; kSameAsRequested stops the arena doubling past what is used.
    opts: dict[str, Any] = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    if cuda_mem_limit_mb:
        opts["gpu_mem_limit"] = cuda_mem_limit_mb * 1024 * 1024
    return opts


@dataclass
class OnnxModel:
    """A loaded, contract-checked ONNX Runtime session."""

    session: ort.InferenceSession
    metadata: ModelMetadata
    provider: str
    sha256: str
    path: Path
    outputs: tuple[str, ...] = (OUTPUT_NAME,)  # probabilities first, then the declared optional outputs

    @classmethod
    def load(
        cls, path: Path, providers: list[str], intra_op_threads: int | None = None, cuda_mem_limit_mb: int = 0
    ) -> OnnxModel:
        """Open ``path`` with the first usable provider and check it follows the contract.

        Args:
            path: the .onnx file.
            providers: preference order, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``.
            intra_op_threads: ONNX Runtime compute threads (None: chosen for the provider).
            cuda_mem_limit_mb: CUDA arena limit (0: none).

        Raises:
            ModelLoadError: unreadable file, missing/garbled metadata or wrong input/output.
        """
        usable = choose_providers(providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1  # one batch at a time: parallelism lives inside the ops
        if intra_op_threads is None:
            intra_op_threads = 1 if usable[0] == CUDA else 0
        opts.intra_op_num_threads = intra_op_threads
        # Spinning threads would burn the cores that decode the next batch's images.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=opts, providers=[(p, provider_options(p, cuda_mem_limit_mb)) for p in usable]
            )
        except Exception as exc:  # ORT raises several unrelated types for unreadable files
            reason = str(exc).splitlines()[0].split(" : ")[-1].split(" failed:")[-1][:200]
            raise ModelLoadError(f"not a loadable ONNX model ({reason})") from None
        try:
            metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, source="the file")
        except MetadataError as exc:
            raise ModelLoadError(str(exc)) from None
        outputs = cls._check_io(session, metadata)
        model = cls(session, metadata, session.get_providers()[0], file_sha256(path), path, outputs)
        log.info(
            "model loaded",
            extra={"model": metadata.name, "version": metadata.version, "provider": model.provider},
        )
        return model

    @staticmethod
    def _check_io(session: ort.InferenceSession, meta: ModelMetadata) -> tuple[str, ...]:
        """Check the input and outputs against the metadata; returns the output names to fetch."""
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ModelLoadError(f"the model must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
        inp = inputs[INPUT_NAME]
        if inp.type != "tensor(uint8)":
            raise ModelLoadError(f"input {INPUT_NAME!r} is {inp.type}, the contract says uint8")
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1:] != [meta.input_size, meta.input_size, 3]:
            raise ModelLoadError(f"input shape {shape} is not [N, {meta.input_size}, {meta.input_size}, 3]")
        # An optional output and its metadata come together: one without the other is a broken export.
        declared = {OOD_OUTPUT: (meta.ood is not None, 1), CAM_OUTPUT: (meta.cam is not None, 4)}
        fetch = [OUTPUT_NAME]
        for name, (in_meta, rank) in declared.items():
            if in_meta != (name in outputs):
                has, lacks = ("metadata", "output") if in_meta else ("output", "metadata")
                raise ModelLoadError(f"the file has the {name!r} {has} but not its {lacks}; re-export it")
            if not in_meta:
                continue
            out_shape = list(outputs[name].shape)
            if outputs[name].type != "tensor(float)" or len(out_shape) != rank:
                raise ModelLoadError(
                    f"output {name!r} is {outputs[name].type} {out_shape}, expected float32 of rank {rank}"
                )
            if name == CAM_OUTPUT and meta.cam is not None and out_shape[1:] != meta.cam.shape:
                raise ModelLoadError(f"output {name!r} has shape {out_shape}, its metadata says [N, *{meta.cam.shape}]")
            fetch.append(name)
        return tuple(fetch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """``uint8 [N, S, S, 3]`` -> ``float32 [N, K]`` probabilities."""
        (probs,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return np.asarray(probs, dtype=np.float32)

    def run_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities and the file's optional outputs (``ood_score`` [N], ``cam`` [N, K, h, w]) in one run."""
        values = self.session.run(list(self.outputs), {INPUT_NAME: batch})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.outputs, values, strict=True)}
