"""The Open Inference Protocol v2 (KServe v2) over HTTP/REST: the protocol Triton, KServe, MLServer and
TorchServe answer, so their clients (``tritonclient``, KServe's SDK) work against lesionserve unchanged.

:mod:`service.oip.tensors` reads and writes the wire format (JSON and the binary tensor extension);
:mod:`service.oip.routes` serves it on the same runtime, batcher, limits, auth, metrics and audit as
``/v1/classify``.
"""
