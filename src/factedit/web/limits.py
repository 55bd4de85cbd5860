"""What one client may make the server do: job cost bounds, caps on memory and concurrency, timeouts.

A local tool still has to survive a buggy script or a hostile page: every resource a request can
hold (worker time, replaced weights, upload bytes, connections, slots in a queue) has a cap here,
with a default documented in ``docs/web.md`` and a ``factedit serve`` option to change it.

Job cost is counted in *token-block passes*: one token of one sequence through one transformer
block, forward (a backward pass counts two more). It is estimated from the request alone, before
anything is queued, so a job that would hold the single worker for hours is refused with the
estimate and the limit in its message (a 422), instead of being found out an hour later.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace
from typing import Any

from factedit.tracing.kinds import KINDS, window_layers

MiB = 1024 * 1024

# The reference machine of docs/web.md (an AMD EPYC VM with 2 cores, one torch thread) ran about this many
# token-block passes per second in traces of the default model (9,200-9,500 measured).
REFERENCE_UNITS_PER_SECOND = 9_000.0


@dataclass(frozen=True)
class WebLimits:
    """Every bound of the web app and its server, with the defaults ``factedit serve`` uses.

    Sizes in bytes, times in seconds, costs in token-block passes (see the module docstring).
    """

    max_job_cost: int = 5_000_000  # about 9 minutes of one thread on the reference machine
    max_queued_jobs: int = 16  # jobs waiting behind the running one
    max_patches: int = 16  # applied patches on the stack
    max_patch_memory: int = 512 * MiB  # replaced weights the stack keeps so that it can revert bit-exact
    max_body_bytes: int = 256 * 1024  # one JSON request
    max_upload_bytes: int = 64 * MiB  # one patch file
    max_upload_memory: int = 160 * MiB  # upload bytes being received or waiting to be applied, all together
    max_pending_predictions: int = 256  # predictions waiting for the model
    prediction_batch: int = 16  # predictions answered by one forward pass
    busy_timeout: float = 5.0  # how long a prediction waits for a running job before "busy"
    body_timeout: float = 30.0  # a request body must arrive within this (whole body)
    header_timeout: float = 10.0  # request headers must arrive within this after connecting (or after a response)
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections; the oldest still sending headers is dropped for a new one
    max_header_bytes: int = 64 * 1024  # request line and headers (h11's incomplete-event limit)
    backlog: int = 1024  # connections the kernel queues before they are accepted

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"web limit {f.name} must be a positive number, got {value!r}")
        if self.max_upload_memory < self.max_upload_bytes:
            raise ValueError("max_upload_memory must be at least max_upload_bytes (one upload must fit)")

    def with_changes(self, **changes: Any) -> WebLimits:
        """A copy with the given fields changed (``None`` values keep the default)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def public(self) -> dict[str, Any]:
        """What ``/api/info`` shows (every field: none of them is a secret)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class CostTooHigh(Exception):
    """A job's estimated cost exceeds :attr:`WebLimits.max_job_cost` (answered 422)."""

    def __init__(self, what: str, estimate: int, limit: int, hint: str, rate: float | None = None) -> None:
        self.what, self.estimate, self.limit = what, estimate, limit
        speed = rate or REFERENCE_UNITS_PER_SECOND
        where = "at this server's measured speed" if rate else "on the reference CPU"
        super().__init__(
            f"this {what} would cost about {estimate:,} token-block passes (~{format_seconds(estimate / speed)} "
            f"{where}), above this server's limit of {limit:,} per job (factedit serve --max-job-cost); {hint}"
        )


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def trace_cost(n_tokens: int, subject_first: int, n_layers: int, samples: int, window: int) -> int:
    """Token-block passes of a fast causal trace of every kind in :data:`KINDS`.

    The clean run and the corrupted runs (``samples``), then one restoration per (kind, token from
    the subject's first on, layer): ``samples`` rows of the tokens from ``t`` on, through the blocks
    from the first restored one (the fast tracer's work, see ``factedit.tracing.fast``).
    """
    T, L = n_tokens, n_layers
    total = (1 + samples) * T * L
    tail = sum(T - t for t in range(subject_first, T))  # tokens re-run per layer, summed over traced tokens
    for layer in range(L):
        for kind in KINDS:
            start = layer + 1 if kind == "hidden" else window_layers(layer, window, L).start
            total += samples * tail * (L - start)
    return int(total)


def edit_cost(
    *,
    n_layers: int,
    prompt_tokens: int,
    steps: int,
    rows: int,
    probes: int,
    generate_tokens: int,
) -> int:
    """Token-block passes of one web edit: optimisation, probes before and after, two generations.

    ``steps`` optimisation steps of ``rows`` sequences of about ``prompt_tokens + 10`` tokens
    (context-template prefix), forward and backward (3 passes); ``probes`` prompts scored before
    and after; ``generate_tokens`` generated before and after (one token per step with a cache).
    The one-time statistics pass (server-configured, then cached) is not counted.
    """
    tokens = prompt_tokens + 10
    optimisation = steps * rows * tokens * n_layers * 3
    probing = 2 * probes * prompt_tokens * n_layers
    generation = 2 * (prompt_tokens + generate_tokens) * n_layers
    return int(optimisation + probing + generation)


def edit_shape(hp: Any) -> tuple[int, int]:
    """``(steps, rows)`` of a method's optimisation from its hyper-parameters (``v_*`` or FT's)."""
    if hasattr(hp, "v_num_grad_steps"):
        spec = getattr(hp, "template_spec", None)
        templates = sum(n for _, n in spec.length_params) + 1 if spec is not None else 1
        return int(hp.v_num_grad_steps), templates + 1  # + the KL prompt
    return int(getattr(hp, "num_steps", 1)), 1


class ByteBudget:
    """Bytes held by requests in flight (upload bodies, parsed patches waiting to be applied).

    ``take(n)`` reserves ``n`` bytes or returns False when that would exceed ``limit``; ``give(n)``
    returns them. Thread-safe (the guard takes on the event loop, jobs give back on the worker).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def take(self, n: int) -> bool:
        with self._lock:
            if n < 0 or self._held + n > self.limit:
                return False
            self._held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._held = max(0, self._held - n)
