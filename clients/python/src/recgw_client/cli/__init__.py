"""The `recgw` command (``pip install 'recgw-client[cli]'``).

It holds the client commands (upload, status, abort, salvage, creds) and adds
those of every installed plugin: a plugin is an entry point of the group
``recgw.commands`` naming a callable ``register(app: typer.Typer) -> None``.
The gateway's package (recgw-server) registers serve, dev and policy this way,
so one `recgw` command shows all of them when both are installed.
"""

from __future__ import annotations

import sys

PLUGIN_GROUP = "recgw.commands"
_CLI_MODULES = ("typer", "rich", "click")


def main() -> None:
    """Run the `recgw` command."""
    try:
        from recgw_client.cli.commands import make_app
    except ModuleNotFoundError as err:
        if err.name not in _CLI_MODULES:
            raise
        print(
            "recgw: the command line needs the 'cli' extra: pip install 'recgw-client[cli]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    make_app()()
