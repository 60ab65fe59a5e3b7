"""Client-side commands of `recgw`: upload and creds."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the client commands to the `recgw` app."""
