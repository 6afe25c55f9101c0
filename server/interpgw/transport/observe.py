"""Per-RPC observation for the metrics: in flight, final status and duration, and what a stream carried.

The `unary`/`streaming` decorators in `errors.py` open one `RpcObservation` per call and show it every streamed
message: the first `token` event gives the time to first token, a `done` event the token counts, `tensor`
chunks the captured bytes (a tensor counts once, at its chunk with offset 0). Without metrics nothing is done.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from interpgw.metrics import GatewayMetrics
from interpgw.transport.chunks import EncodedChunk


class RpcObservation:
    """One RPC's metrics; `finish` records the final status once, whatever path the call ends by."""

    def __init__(self, metrics: GatewayMetrics, servicer: Any, method: str, request: Any) -> None:
        self._metrics = metrics
        self._servicer = servicer
        self._method = method
        self._request = request
        self._model: str | None = None
        self._first_token = True
        self._finished = False
        self._start = metrics.rpc_started(method)

    def message(self, item: Any) -> None:
        if isinstance(item, EncodedChunk):
            self._metrics.captured(self.model(), item.data_bytes, 1 if item.first else 0)
            return
        try:
            kind = item.WhichOneof("event")
        except (AttributeError, ValueError):  # not a message with an `event` oneof
            return
        if kind == "token":
            if self._first_token:
                self._first_token = False
                self._metrics.first_token(self.model(), self._elapsed())
        elif kind == "done":
            done = item.done
            self._metrics.tokens(self.model(), len(done.prompt_token_ids), len(done.output_token_ids), self._elapsed())

    def finish(self, code: grpc.StatusCode) -> None:
        if self._finished:
            return
        self._finished = True
        self._metrics.rpc_finished(self._method, code.name, self._elapsed())

    def model(self) -> str:
        """The served model's id: never the raw request field, which a client could fill with anything."""
        if self._model is None:
            self._model = ""
            try:
                self._model = str(self._servicer.service.model(getattr(self._request, "model", "")).facts.id)
            except Exception:  # noqa: BLE001 - an unknown model fails the RPC elsewhere; here it only has no label
                pass
        return self._model

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start


class _Unobserved:
    """Stands in when the servicer has no metrics."""

    def message(self, item: Any) -> None:
        pass

    def finish(self, code: grpc.StatusCode) -> None:
        pass


UNOBSERVED = _Unobserved()


def observe(servicer: Any, method: str, request: Any) -> RpcObservation | _Unobserved:
    metrics = getattr(servicer, "metrics", None)
    if metrics is None:
        return UNOBSERVED
    return RpcObservation(metrics, servicer, method, request)
