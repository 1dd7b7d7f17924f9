"""What a running server holds: its model as it loads, the engine's worker, its key and limits.

Contract: `ServerState` starts `loading` with the model's id in the API (`server.served_id`:
from MODEL, decided before anything loads); `ready(model)` serves that model under the same
id, so the id never changes. `require_model()` is the model for a request, or a 503
`ApiError` (loading: with `Retry-After`; failed or stopping: `apierror.stopping`). `log` takes
the server's log lines. Plain data: the app and its endpoints read it, `server.py` and the
command line set it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from qwenrun.serve.apierror import ApiError, stopping
from qwenrun.serve.enginethread import Worker
from qwenrun.serve.runner import ServedModel

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a full 256K-token context is a few MB of text


@dataclass
class ServerState:
    model_id: str
    worker: Worker
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    log: Callable[[str], None] = print
    status: Literal["loading", "ready", "failed", "stopping"] = "loading"
    model: ServedModel | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def ready(self, model: ServedModel) -> None:
        model.id = self.model_id  # the id clients have seen since the server started
        self.model, self.status = model, "ready"

    def require_model(self) -> ServedModel:
        if self.status == "ready" and self.model is not None:
            return self.model
        if self.status == "loading":
            raise ApiError(
                503,
                "the model is loading; try again shortly",
                "unavailable_error",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        raise stopping()
