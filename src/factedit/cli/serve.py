"""``factedit serve``: the local web app (registered into the main CLI by ``factedit.cli.main``)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated, Optional

import typer
from rich.console import Console

from factedit.errors import FactEditError

err = Console(stderr=True)
log = logging.getLogger(__name__)


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="registry name (default smollm2-135m), .gguf file, folder or hub id")]
HostOpt = Annotated[str, typer.Option(help="address to bind; anything but loopback exposes the model to the network")]
StatsOpt = Annotated[Optional[int], typer.Option(
    help="tokens for the edit statistics (default: the family file's)", min=1)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: ModelOpt = None,
    port: Annotated[int, typer.Option(help="TCP port (0: pick a free one)", min=0, max=65535)] = 8000,
    host: HostOpt = "127.0.0.1",
    stats_tokens: StatsOpt = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Start the web app (predictions, causal-trace heatmaps, edits, patches) and print its address."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - a dependency, but say what to do if it is missing
        err.print("[bold red]error:[/] the web app needs fastapi and uvicorn: "
                  "pip install fastapi uvicorn python-multipart")
        raise typer.Exit(2) from None
    from factedit.models import load_model
    from factedit.models.registry import DEFAULT_MODEL
    from factedit.web.app import LOOPBACK_HOSTS, create_app

    name = model or DEFAULT_MODEL  # the operator may name any model load_model accepts; clients only registry names
    try:
        mdl, tok = load_model(name, device=device, dtype=dtype)
    except FactEditError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    loopback = _is_loopback(host)
    if not loopback:
        err.print(f"[yellow]warning:[/] binding {host}: anyone who can reach it can edit the model", highlight=False)
    overrides = {"mom2_n_tokens": stats_tokens} if stats_tokens else None
    app = create_app(mdl, tok, model_name=name, hparams_overrides=overrides,
                     allowed_hosts=LOOPBACK_HOSTS if loopback else ("*",))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024)
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
