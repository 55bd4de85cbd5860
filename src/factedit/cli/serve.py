"""``factedit serve``: the local web app (registered into the main CLI by ``factedit.cli.main``).

Every limit of :class:`factedit.web.limits.WebLimits` has an option here (defaults in ``docs/web.md``);
the applied patches are saved under ``$FACTEDIT_HOME/web`` and restored on start unless ``--no-persist``.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated, Optional

import typer

from factedit.cli.options import DataDirOpt, ModelChoice, fail, warn, with_model_options
from factedit.errors import FactEditError

log = logging.getLogger(__name__)


HostOpt = Annotated[
    str, typer.Option(help="address to bind; anything but loopback exposes the model to the network", metavar="ADDRESS")
]
AllowedHostOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--allowed-host",
        metavar="NAME",
        help="another name clients may use in the Host header (repeatable; loopback names and --host are always "
        "allowed; '*' accepts any Host, cross-origin requests stay refused)",
    ),
]
StatsOpt = Annotated[
    Optional[int], typer.Option(help="tokens for the edit statistics (default: the family file's)", min=1, metavar="N")
]
# The defaults are those of factedit.web.limits.WebLimits (repeated in the help texts: importing it
# here would import torch for `factedit --help`); None keeps the default.


def _int_opt(help_text: str, metavar: str = "N", minimum: int = 1):
    return Annotated[Optional[int], typer.Option(help=help_text, min=minimum, metavar=metavar)]


def _float_opt(help_text: str):
    return Annotated[Optional[float], typer.Option(help=help_text, min=0.1, metavar="SECONDS")]


MaxJobCostOpt = _int_opt(
    "largest estimated cost of one trace or edit, in token-block passes (default 5,000,000: about 9 min of one "
    "thread on the reference CPU); larger jobs are refused with the estimate"
)
MaxQueuedOpt = _int_opt("jobs that may wait behind the running one (default 16)")
MaxPatchesOpt = _int_opt("applied patches kept on the stack (default 16)")
MaxPatchMemOpt = _int_opt("MiB of replaced weights the stack may keep to revert bit-exact (default 512)", "MIB")
MaxUploadOpt = _int_opt("largest patch file, MiB (default 64)", "MIB")
MaxUploadMemOpt = _int_opt(
    "MiB of request bodies in flight and uploaded patches waiting to be applied, all together (default 160)", "MIB"
)
MaxPredictionsOpt = _int_opt("predictions that may wait for the model (default 256)")
BusyTimeoutOpt = _float_opt("how long a prediction waits for a running job before answering busy (default 5)")
BodyTimeoutOpt = _float_opt("a request body must arrive within this (default 30)")
HeaderTimeoutOpt = _float_opt("request headers must arrive within this of connecting (default 10)")
KeepAliveOpt = _float_opt("idle keep-alive connections are closed after this (default 5)")
MaxConnectionsOpt = _int_opt(
    "open connections (default 512; at the cap the one waiting longest without a request is closed)"
)
BacklogOpt = _int_opt("connections the kernel queues before they are accepted (default 1024)")
PersistOpt = Annotated[
    bool,
    typer.Option(
        "--persist/--no-persist",
        help="save the applied patches under $FACTEDIT_HOME/web/<model> and re-apply them (verified) on start",
    ),
]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str, extra: list[str] | None) -> tuple[str, ...]:
    """The ``Host`` names the app answers to: loopback names, the bound address, then ``extra``."""
    from factedit.web.app import LOOPBACK_HOSTS, normalize_host

    names = list(LOOPBACK_HOSTS)
    try:
        unspecified = ipaddress.ip_address(normalize_host(host)).is_unspecified  # 0.0.0.0 / :: is no Host
    except ValueError:
        unspecified = False
    if not unspecified:
        names.append(normalize_host(host))
    for name in extra or []:
        name = normalize_host(name)
        if name != "*" and (not name or any(c in name for c in "/@ \t") or (":" in name and not _is_ip(name))):
            raise FactEditError(f"--allowed-host {name!r}: give a host name or address, without scheme or port")
        names.append(name)
    return tuple(dict.fromkeys(names))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@with_model_options
def serve_command(
    port: Annotated[int, typer.Option(help="TCP port (0: pick a free one)", min=0, max=65535, metavar="PORT")] = 8000,
    host: HostOpt = "127.0.0.1",
    allowed_host: AllowedHostOpt = None,
    stats_tokens: StatsOpt = None,
    persist: PersistOpt = True,
    max_job_cost: MaxJobCostOpt = None,
    max_queued_jobs: MaxQueuedOpt = None,
    max_patches: MaxPatchesOpt = None,
    max_patch_memory: MaxPatchMemOpt = None,
    max_upload: MaxUploadOpt = None,
    max_upload_memory: MaxUploadMemOpt = None,
    max_pending_predictions: MaxPredictionsOpt = None,
    busy_timeout: BusyTimeoutOpt = None,
    body_timeout: BodyTimeoutOpt = None,
    header_timeout: HeaderTimeoutOpt = None,
    keep_alive_timeout: KeepAliveOpt = None,
    max_connections: MaxConnectionsOpt = None,
    backlog: BacklogOpt = None,
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Start the web app (predictions, causal-trace heatmaps, edits, patches) and print its address."""
    try:
        import uvicorn  # noqa: F401 - only to say what is missing
    except ImportError:  # pragma: no cover - a dependency, but say what to do if it is missing
        fail("the web app needs fastapi and uvicorn: pip install fastapi uvicorn python-multipart")
    from factedit.paths import factedit_home
    from factedit.web.app import create_app
    from factedit.web.limits import MiB, WebLimits
    from factedit.web.server import make_server

    name = choice.label  # the operator may name any model load_model accepts; clients only registry names
    mib = lambda n: None if n is None else n * MiB  # noqa: E731
    try:
        hosts = allowed_hosts_for(host, allowed_host)
        limits = WebLimits().with_changes(
            max_job_cost=max_job_cost,
            max_queued_jobs=max_queued_jobs,
            max_patches=max_patches,
            max_patch_memory=mib(max_patch_memory),
            max_upload_bytes=mib(max_upload),
            max_upload_memory=mib(max_upload_memory),
            max_pending_predictions=max_pending_predictions,
            busy_timeout=busy_timeout,
            body_timeout=body_timeout,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            max_connections=max_connections,
            backlog=backlog,
        )
    except ValueError as exc:  # e.g. --max-upload above --max-upload-memory
        message = str(exc).replace("max_upload_bytes", "--max-upload")
        fail(message.replace("max_upload_memory", "--max-upload-memory").replace("_", "-"))
    try:
        mdl, tok = ModelChoice(name, choice.device, choice.dtype, choice.threads, choice.device_map).load()
    except FactEditError as exc:
        fail(exc)
    loopback = _is_loopback(host)
    if not loopback:
        warn(
            f"binding {host}: anyone who can reach it can edit the model; it answers to Host "
            f"{', '.join(hosts)} (--allowed-host NAME adds the names clients use)"
        )
    overrides = {"mom2_n_tokens": stats_tokens} if stats_tokens else None
    store = factedit_home() / "web" if persist else None
    app = create_app(
        mdl, tok, model_name=name, hparams_overrides=overrides, allowed_hosts=hosts, limits=limits, patch_store=store
    )
    kept = app.state.session.persistence
    if kept.get("restored"):
        typer.echo(f"restored {kept['restored']} applied patch(es) from {kept['folder']}", err=True)
    if kept.get("problem"):
        warn(kept["problem"])
    if not kept.get("enabled"):
        warn("applied patches are kept in memory only: a restart or a crash loses them (see docs/web.md)")
    server = make_server(app, host, port, limits)

    # Print the address once the socket is bound (port 0 picks a free port, known only then).
    original_startup = server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                bound_host, bound_port = sock.getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                typer.echo(f"factedit web app ({name}) at http://{shown}:{bound_port}/", err=False)
                return

    server.startup = startup  # type: ignore[method-assign]
    server.run()


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the main app."""
    app.command("serve")(serve_command)
