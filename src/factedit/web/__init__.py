"""A local web app for factedit: predictions, causal-trace heatmaps, edits and patches in the browser.

``create_app(model, tokenizer)`` builds the FastAPI app (``factedit serve`` runs it with
uvicorn on 127.0.0.1). FastAPI and uvicorn are imported only when the app is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(*args: Any, **kwargs: Any) -> FastAPI:
    """See :func:`factedit.web.app.create_app`."""
    from factedit.web.app import create_app as _create

    return _create(*args, **kwargs)


__all__ = ["create_app"]
