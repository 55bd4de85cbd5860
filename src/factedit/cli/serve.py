"""``factedit serve``: the local web app (registered into the main CLI by ``factedit.cli.main``)."""

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
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Start the web app (predictions, causal-trace heatmaps, edits, patches) and print its address."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - a dependency, but say what to do if it is missing
        fail("the web app needs fastapi and uvicorn: pip install fastapi uvicorn python-multipart")
    from factedit.web.app import create_app

    name = choice.label  # the operator may name any model load_model accepts; clients only registry names
    try:
        hosts = allowed_hosts_for(host, allowed_host)
        mdl, tok = ModelChoice(name, choice.device, choice.dtype, choice.threads).load()
    except FactEditError as exc:
        fail(exc)
    loopback = _is_loopback(host)
    if not loopback:
        warn(
            f"binding {host}: anyone who can reach it can edit the model; it answers to Host "
            f"{', '.join(hosts)} (--allowed-host NAME adds the names clients use)"
        )
    overrides = {"mom2_n_tokens": stats_tokens} if stats_tokens else None
    app = create_app(mdl, tok, model_name=name, hparams_overrides=overrides, allowed_hosts=hosts)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024
    )
    server = uvicorn.Server(config)

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
