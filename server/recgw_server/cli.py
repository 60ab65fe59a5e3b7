"""The `recgw` command: serve, dev, policy, upload, creds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from recgw_server import cli_client
from recgw_server.logs import configure_logging

app = typer.Typer(
    help="recgw: a gRPC gateway that streams call recordings into the customer's S3 bucket.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cli_client.register(app)


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="RECGW_CONFIG",
            help="TOML config file; RECGW_* environment variables override it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run the gateway (production). SIGHUP reloads tokens and limits from the file."""
    from recgw_server.app import serve as run_server
    from recgw_server.config import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    from recgw_server.tls import TlsError

    try:
        asyncio.run(run_server(settings, config))
    except TlsError as error:
        typer.echo(f"recgw serve: {error}", err=True)
        raise typer.Exit(2) from None


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Gateway port.")] = 50051,
    s3_port: Annotated[int, typer.Option(help="moto_server (S3) port.")] = 5000,
    vault_port: Annotated[int, typer.Option(help="OpenBao dev server port.")] = 8200,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port; 0 turns it off.")] = 9464,
    data_dir: Annotated[Path, typer.Option(help="Where logs of the stack go.")] = Path(
        ".recgw-dev"
    ),
    tls: Annotated[
        bool, typer.Option("--tls", help="Serve TLS with a throwaway CA made in the data dir.")
    ] = False,
    mtls: Annotated[
        bool, typer.Option("--mtls", help="Like --tls, and require client certificates.")
    ] = False,
) -> None:
    """Start a local stack: OpenBao, moto (S3 with IAM on), a demo tenant and the gateway."""
    from recgw_server.dev.command import DevOptions, run_dev

    configure_logging("INFO")
    options = DevOptions(
        port=port,
        s3_port=s3_port,
        vault_port=vault_port,
        metrics_port=metrics_port,
        data_dir=data_dir,
        tls="mtls" if mtls else "tls" if tls else "",
    )
    asyncio.run(run_dev(options))


_POLICY_NOTE = """\
Where each document goes (each put-* call REPLACES what is there: merge with existing ones):
  identity_policy         inline policy of the gateway's IAM user:
                          aws iam put-user-policy --user-name USER --policy-name recgw-uploads \\
                            --policy-document file://identity_policy.json
  bucket_policy           optional second fence, on the bucket:
                          aws s3api put-bucket-policy --bucket {bucket} \\
                            --policy file://bucket_policy.json
  lifecycle_configuration cleans up multipart uploads the gateway could not abort:
                          aws s3api put-bucket-lifecycle-configuration --bucket {bucket} \\
                            --lifecycle-configuration file://lifecycle_configuration.json
Split the output with jq, e.g. jq .identity_policy recgw-policy.json > identity_policy.json
"""
_PLACEHOLDER_NOTE = (
    "bucket_policy: replace {placeholder} with the user's ARN "
    "(aws iam get-user --user-name USER --query User.Arn), or re-run with --principal ARN.\n"
)


@app.command()
def policy(
    bucket: Annotated[str, typer.Option(help="Bucket name (not an ARN).")],
    prefix: Annotated[str, typer.Option(help="Key prefix the gateway writes under.")] = "uploads/",
    principal: Annotated[
        str | None,
        typer.Option(help="ARN of the gateway's IAM user, the bucket policy's principal."),
    ] = None,
    allow_abort: Annotated[
        bool, typer.Option("--allow-abort", help="Also allow s3:AbortMultipartUpload.")
    ] = False,
    abort_after_days: Annotated[
        int, typer.Option(help="Lifecycle: abort incomplete multipart uploads after N days.")
    ] = 7,
) -> None:
    """Print the IAM policy, bucket policy and lifecycle rule for a least-privilege set-up."""
    from recgw_server import policy as documents

    try:
        output = {
            "identity_policy": documents.identity_policy(bucket, prefix, allow_abort),
            "bucket_policy": documents.bucket_policy(
                bucket, prefix, principal, allow_abort=allow_abort
            ),
            "lifecycle_configuration": documents.lifecycle_rule(prefix, abort_after_days),
        }
    except ValueError as error:
        typer.echo(f"recgw policy: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(output, indent=2))
    typer.echo(_POLICY_NOTE.format(bucket=bucket), err=True, nl=False)
    if principal is None:
        typer.echo(
            _PLACEHOLDER_NOTE.format(placeholder=documents.PRINCIPAL_PLACEHOLDER),
            err=True,
            nl=False,
        )


def main() -> None:
    app()
