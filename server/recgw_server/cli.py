"""The gateway's commands of `recgw`: serve, migrate, dev, policy.

The `recgw` command itself belongs to the client package (recgw_client.cli), which
holds upload, status, abort, salvage and creds; it loads these commands through the
`recgw.commands` entry point of this package (see `register`).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from recgw_server.logs import configure_logging

app = typer.Typer(
    help="recgw: a gRPC gateway that streams call recordings into the customer's S3 bucket.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


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
    except (TlsError, ConfigError) as error:
        typer.echo(f"recgw serve: {error}", err=True)
        raise typer.Exit(2) from None


@app.command()
def migrate(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="RECGW_CONFIG",
            help="TOML config file (its data_dir and [sessions]); RECGW_* variables override it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    from_sqlite: Annotated[
        Path | None,
        typer.Option(
            "--from-sqlite",
            help="Copy every session of this SQLite data dir (or sessions.sqlite3 file) into "
            "the PostgreSQL store; refuses if any of them exists there already.",
            exists=True,
        ),
    ] = None,
) -> None:
    """Bring the session store's schema up to date (`recgw serve` does so at start-up too)."""
    from recgw_server.config import ConfigError, load_store_settings
    from recgw_server.sessions.migrate import MigrateError, migrate_store

    try:
        settings = load_store_settings(config)
        report = asyncio.run(migrate_store(settings, from_sqlite))
    except (ConfigError, MigrateError) as error:
        typer.echo(f"recgw migrate: {error}", err=True)
        raise typer.Exit(1) from None
    for line in report:
        typer.echo(line)


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
    env_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write the address, tokens and tenant as RECGW_* lines to this file "
            "(mode 0600), for test runners; the banner stays for people."
        ),
    ] = None,
    replicas: Annotated[
        int,
        typer.Option(
            min=0,
            max=16,
            help="Run this many `recgw serve` replicas on consecutive ports from --port (and "
            "--metrics-port), over a throwaway PostgreSQL cluster (needs its server binaries), "
            "instead of one gateway over SQLite.",
        ),
    ] = 0,
) -> None:
    """Start a local stack: OpenBao, moto (S3 with IAM on), a demo tenant and the gateway."""
    from recgw_server.dev.command import DevOptions, run_dev
    from recgw_server.dev.replicas import DevStackError

    configure_logging("INFO")
    options = DevOptions(
        port=port,
        s3_port=s3_port,
        vault_port=vault_port,
        metrics_port=metrics_port,
        data_dir=data_dir,
        tls="mtls" if mtls else "tls" if tls else "",
        env_file=env_file,
        replicas=replicas,
    )
    try:
        asyncio.run(run_dev(options))
    except DevStackError as error:
        typer.echo(f"recgw dev: {error}", err=True)
        raise typer.Exit(1) from None


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
_ROLE_NOTE = """\
Role set-up (no secret is exchanged):
  1. recgw creds set --tenant T --role-arn arn:aws:iam::ACCOUNT-ID:role/{role_name} ... and
     recgw creds describe --tenant T show the tenant's external_id and the trusted_principal.
  2. Create the role in one step:
       jq .cloudformation_template recgw-policy.json > recgw-role.json
       aws cloudformation deploy --template-file recgw-role.json --stack-name recgw-writer \\
         --capabilities CAPABILITY_NAMED_IAM
     or paste trust_policy and permission_policy into a new role in the IAM console.
  3. recgw creds verify --tenant T checks everything uploads need.
"""
_ACCESS_POINT_NOTE = """\
Access point: an identity policy on the bucket's ARN alone does NOT grant writes through an
access point. Writes through {access_point} need all three:
  identity_policy / permission_policy  s3:PutObject on the access point's object ARN (above)
  access_point_policy                  aws s3control put-access-point-policy \\
                                         --account-id {account} --name {name} \\
                                         --policy file://access_point_policy.json
  bucket_policy_statement              add it to the bucket policy of {bucket}; it delegates
                                       writes under the prefix to this access point
"""
_ROLE_PLACEHOLDER_NOTE = (
    "trust_policy: replace {principal} and {external_id} with the trusted_principal and "
    "external_id that `recgw creds describe` shows, or re-run with --gateway-principal and "
    "--external-id.\n"
)
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
    allow_confirm: Annotated[
        bool,
        typer.Option(
            "--allow-confirm",
            help="Also allow s3:GetObject, used only for HeadObject, so a completion whose answer "
            "was lost is confirmed instead of reported as unconfirmed (AWS has no "
            "metadata-only permission).",
        ),
    ] = False,
    abort_after_days: Annotated[
        int, typer.Option(help="Lifecycle: abort incomplete multipart uploads after N days.")
    ] = 7,
    role: Annotated[
        bool,
        typer.Option(
            "--role",
            help="Documents for an IAM role the gateway assumes: trust policy, permission "
            "policy, CloudFormation template.",
        ),
    ] = False,
    gateway_principal: Annotated[
        str | None,
        typer.Option(help="With --role: the gateway's principal ARN (trusted_principal)."),
    ] = None,
    external_id: Annotated[
        str | None,
        typer.Option(help="With --role: the tenant's external_id (recgw creds describe)."),
    ] = None,
    kms_key_arn: Annotated[
        str | None,
        typer.Option(help="SSE-KMS key ARN: adds kms:GenerateDataKey and kms:Decrypt."),
    ] = None,
    role_name: Annotated[str, typer.Option(help="With --role: the role's name.")] = (
        "recgw-writer"
    ),
    access_point: Annotated[
        str | None,
        typer.Option(
            help="Access point ARN the gateway writes through: adds its access point policy "
            "and the bucket policy statement that delegates to it."
        ),
    ] = None,
) -> None:
    """Print the IAM policy, bucket policy and lifecycle rule for a least-privilege set-up.

    With --role: the role's trust and permission policies and a CloudFormation template;
    with --access-point: the access point policy and the delegating bucket policy statement.
    """
    from recgw_server import policy as documents
    from recgw_server.storage.access_points import parse_access_point

    try:
        target = access_point or bucket
        documents.validate_bucket(bucket)
        if access_point and parse_access_point(access_point) is None:
            raise ValueError(
                f"invalid access point ARN {access_point!r}: expected "
                "arn:aws:s3:REGION:ACCOUNT-ID:accesspoint/NAME"
            )
        output: dict[str, object]
        if role:
            output = {
                "trust_policy": documents.trust_policy(gateway_principal, external_id),
                "permission_policy": documents.permission_policy(
                    target,
                    prefix,
                    kms_key_arn,
                    allow_abort=allow_abort,
                    allow_confirm=allow_confirm,
                ),
                "cloudformation_template": documents.role_cloudformation(
                    target,
                    prefix,
                    gateway_principal,
                    external_id,
                    role_name=role_name,
                    kms_key_arn=kms_key_arn,
                    allow_abort=allow_abort,
                ),
            }
        else:
            identity = documents.permission_policy(
                target, prefix, kms_key_arn, allow_abort=allow_abort, allow_confirm=allow_confirm
            )
            output = {
                "identity_policy": identity,
                "bucket_policy": documents.bucket_policy(
                    bucket, prefix, principal, allow_abort=allow_abort
                ),
            }
        if access_point:
            point = parse_access_point(access_point)
            assert point is not None
            writer = f"arn:aws:iam::{point.account}:role/{role_name}" if role else principal
            output["access_point_policy"] = documents.access_point_policy(
                access_point, prefix, writer
            )
            output["bucket_policy_statement"] = documents.access_point_delegation_statement(
                bucket, access_point, prefix
            )
        output["lifecycle_configuration"] = documents.lifecycle_rule(prefix, abort_after_days)
    except ValueError as error:
        typer.echo(f"recgw policy: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(output, indent=2))
    if role:
        typer.echo(_ROLE_NOTE.format(role_name=role_name), err=True, nl=False)
    else:
        typer.echo(_POLICY_NOTE.format(bucket=bucket), err=True, nl=False)
    if access_point:
        point = parse_access_point(access_point)
        assert point is not None
        typer.echo(
            _ACCESS_POINT_NOTE.format(
                access_point=access_point, account=point.account, name=point.name, bucket=bucket
            ),
            err=True,
            nl=False,
        )
    if role and not (gateway_principal and external_id):
        typer.echo(
            _ROLE_PLACEHOLDER_NOTE.format(
                principal=documents.GATEWAY_PRINCIPAL_PLACEHOLDER,
                external_id=documents.EXTERNAL_ID_PLACEHOLDER,
            ),
            err=True,
            nl=False,
        )
    elif not role and principal is None:
        typer.echo(
            _PLACEHOLDER_NOTE.format(placeholder=documents.PRINCIPAL_PLACEHOLDER),
            err=True,
            nl=False,
        )


def register(root: typer.Typer) -> None:
    """Entry point of the `recgw.commands` group: add the gateway's commands to `recgw`."""
    root.registered_commands.extend(app.registered_commands)
    root.registered_groups.extend(app.registered_groups)


def main() -> None:
    """The whole `recgw` command, client and gateway commands."""
    from recgw_client.cli import main as recgw

    recgw()
