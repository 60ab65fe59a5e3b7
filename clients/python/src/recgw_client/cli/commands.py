"""The commands of `recgw`: upload, status, abort, salvage and creds, plus plugins.

The bearer token comes only from the environment (RECGW_TOKEN) or a file
(--token-file), and a secret access key only from stdin, the environment or a
hidden prompt: argv is visible to every user of the machine (ps, /proc).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib.metadata
import json
import mimetypes
import os
import re
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

import recgw_client
from recgw_client import (
    AbortResult,
    CredentialsAdmin,
    CredentialsView,
    RecgwError,
    RetryPolicy,
    ServerSideEncryption,
    TlsConfig,
    UploadClient,
    UploadResult,
    UploadStatus,
    is_retryable,
)
from recgw_client.cli import PLUGIN_GROUP
from recgw_client.errors import SOURCE_NOT_SEEKABLE

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "RECGW_TOKEN"
SECRET_ENV = "RECGW_SECRET_ACCESS_KEY"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")

AddressOption = Annotated[
    str,
    typer.Option("--address", envvar="RECGW_ADDRESS", help="Gateway address, host:port."),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help=f"File holding the bearer token. Default: the {TOKEN_ENV} environment variable.",
        dir_okay=False,
    ),
]
TlsOption = Annotated[
    bool,
    typer.Option(
        "--tls",
        envvar="RECGW_TLS",
        help="Use TLS (the default for every address but loopback ones).",
    ),
]
PlaintextOption = Annotated[
    bool,
    typer.Option(
        "--plaintext",
        envvar="RECGW_PLAINTEXT",
        help="No TLS. Only the default for loopback addresses (127.0.0.1, ::1, localhost).",
    ),
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        envvar="RECGW_CA_FILE",
        help="PEM root certificates the gateway's certificate must chain to (implies --tls; "
        "default: the system's roots).",
        dir_okay=False,
    ),
]
CertFileOption = Annotated[
    Path | None,
    typer.Option(
        "--cert-file",
        envvar="RECGW_CERT_FILE",
        help="PEM client certificate chain, for a gateway that requires mTLS (needs --key-file).",
        dir_okay=False,
    ),
]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        envvar="RECGW_KEY_FILE",
        help="PEM private key of --cert-file.",
        dir_okay=False,
    ),
]
ServerNameOption = Annotated[
    str | None,
    typer.Option(
        "--server-name",
        envvar="RECGW_SERVER_NAME",
        help="Name the gateway's certificate must carry, if not the host of --address.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant id.")]


class SseMode(enum.StrEnum):
    """Server-side encryption choices of `creds set`."""

    AES256 = "AES256"
    KMS = "aws:kms"


_SSE: dict[SseMode, ServerSideEncryption] = {SseMode.AES256: "AES256", SseMode.KMS: "aws:kms"}


class AbandonedMode(enum.StrEnum):
    """What `creds set --abandoned-uploads` may choose."""

    ABORT = "abort"
    SALVAGE = "salvage"


@dataclass(frozen=True)
class _Connection:
    address: str
    token: str
    tls: TlsConfig | None
    plaintext: bool | None

    def __repr__(self) -> str:
        return f"_Connection(address={self.address!r})"

    def uploads(self) -> UploadClient:
        return UploadClient(self.address, self.token, tls=self.tls, plaintext=self.plaintext)

    def admin(self) -> CredentialsAdmin:
        return CredentialsAdmin(self.address, self.token, tls=self.tls, plaintext=self.plaintext)


@dataclass(frozen=True)
class _Security:
    """The TLS options of a command."""

    tls: bool = False
    plaintext: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


# Stray arguments are collected rather than echoed by the parser's error: one
# may be a secret or token typed by mistake.
_EXTRA_ARGS = {"allow_extra_args": True}


def _reject_extra_args(ctx: typer.Context) -> None:
    if ctx.args:
        _fail(
            f"{len(ctx.args)} unexpected argument(s), not shown. Secrets and tokens are never "
            f"read from the command line: use --secret-stdin, {SECRET_ENV}, {TOKEN_ENV} "
            "or --token-file.",
            EXIT_USAGE,
        )


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _connection(address: str, token_file: Path | None, security: _Security) -> _Connection:
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            _fail(f"cannot read the token file {token_file}: {err}", EXIT_USAGE)
        if not token:
            _fail(f"the token file {token_file} is empty", EXIT_USAGE)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            _fail(f"no bearer token: set {TOKEN_ENV} or pass --token-file PATH", EXIT_USAGE)
    wants_tls = security.tls or any(
        value is not None
        for value in (security.ca_file, security.cert_file, security.key_file, security.server_name)
    )
    if security.plaintext and wants_tls:
        _fail(
            "--plaintext cannot go with --tls, --ca-file, --cert-file, --key-file or --server-name",
            EXIT_USAGE,
        )
    tls = None
    if wants_tls:
        try:
            tls = TlsConfig(
                ca_file=security.ca_file,
                cert_file=security.cert_file,
                key_file=security.key_file,
                server_name=security.server_name,
            )
            tls.credentials()  # reads the files now, to report a bad path before connecting
        except ValueError as err:
            _fail(str(err), EXIT_USAGE)
    plaintext = True if security.plaintext else (False if wants_tls else None)
    return _Connection(address=address, token=token, tls=tls, plaintext=plaintext)


def _error_fields(err: RecgwError) -> dict[str, object]:
    error: dict[str, object] = {"code": err.code.name, "message": err.message}
    if err.reason:
        error["reason"] = err.reason
    if err.metadata:
        error["metadata"] = err.metadata
    if err.upload_id:
        error["upload_id"] = err.upload_id
    if err.attempts > 1:
        error["attempts"] = err.attempts
    return error


def _run(
    coroutine: Coroutine[Any, Any, T],
    *,
    json_output: bool = False,
    hint: Callable[[RecgwError], str] | None = None,
) -> T:
    """Run one client call; gateway errors exit non-zero with the status code and message."""
    try:
        return asyncio.run(coroutine)
    except RecgwError as err:
        if json_output:
            typer.echo(json.dumps({"error": _error_fields(err)}))
        notes = [err.reason] if err.reason else []
        if err.upload_id:
            notes.append(f"upload id {err.upload_id}")
        if err.attempts > 1:
            notes.append(f"{err.attempts} attempts")
        suffix = f" ({', '.join(notes)})" if notes else ""
        _fail(f"{err}{suffix}{hint(err) if hint is not None else ''}")
    except ValueError as err:
        _fail(str(err), EXIT_USAGE)
    except OSError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)


_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _parse_size(text: str, option: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(
            f"{text!r} is not a size such as 1048576, 256KiB or 1MiB", param_hint=option
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _parse_metadata(items: list[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        if key in metadata:
            raise typer.BadParameter(f"{key!r} is given twice", param_hint="--meta")
        metadata[key] = value
    return metadata


def _print_fields(fields: dict[str, object], title: str | None = None) -> None:
    """Aligned `key  value` lines; empty values are left out."""
    rows = [(k.replace("_", " "), str(v)) for k, v in fields.items() if v is not None and v != ""]
    if title:
        typer.echo(title)
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        typer.echo(f"  {key:<{width}}  {value}" if title else f"{key:<{width}}  {value}")


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _result_fields(result: UploadResult) -> dict[str, object]:
    return {
        "upload_id": result.upload_id,
        "bucket": result.bucket,
        "key": result.key,
        "size": result.size,
        "etag": result.etag,
        "version_id": result.version_id,
        "part_count": result.part_count,
        "crc32c": result.checksums.crc32c_hex,
        "sha256": result.checksums.sha256_hex,
        "unconfirmed": result.unconfirmed or None,
    }


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class _SentColumn(ProgressColumn):
    """Bytes sent, for a stream of unknown size."""

    def render(self, task: Task) -> Text:
        return Text(filesize.decimal(int(task.completed)), style="progress.download")


def _progress(total_known: bool, quiet: bool) -> Progress:
    console = Console(stderr=True, quiet=quiet)
    if total_known:
        columns: list[str | ProgressColumn] = [
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        ]
    else:
        columns = [
            SpinnerColumn(),
            TextColumn("{task.description}"),
            _SentColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        ]
    return Progress(*columns, console=console)


def _stdin() -> recgw_client.Readable:
    # Unbuffered and separate from sys.stdin: the reader thread may sit in read()
    # when Ctrl-C ends the process, and must not hold the lock of sys.stdin.buffer,
    # which the interpreter takes at exit.
    try:
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    except (AttributeError, OSError, ValueError):  # no real descriptor, e.g. in tests
        return sys.stdin.buffer


def _known_size(file: str, size: int | None) -> int | None:
    if size is not None or file == "-":
        return size
    try:
        info = os.stat(file)
    except OSError:
        return None  # the upload reports it
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _retry_policy(outage_tolerance: float) -> RetryPolicy:
    """The backoff of `recgw upload` (tests replace it with one that does not sleep)."""
    return RetryPolicy(outage_tolerance=outage_tolerance)


def _resume_line(attempt: int, error: RecgwError, committed: int) -> str:
    why = f"{error.code.name} {error.reason}" if error.reason else error.code.name
    return f"connection lost ({why}); resuming at byte {committed}, stream {attempt}"


async def _upload(
    connection: _Connection,
    file: str,
    *,
    progress: Progress,
    announce: Callable[[str], None],
    notify: Callable[[str], None],
    outage_tolerance: float,
    **options: Any,
) -> UploadResult:
    source = _stdin() if file == "-" else file
    task = progress.add_task("uploading", total=options.get("expected_size"))
    first: list[int] = []

    def on_progress(sent: int, total: int | None) -> None:
        if not first:
            first.append(sent)
            if sent:
                notify(f"continuing at byte {sent}, committed by the gateway earlier")
        progress.update(task, completed=sent, total=total)

    def on_retry(attempt: int, error: RecgwError, committed: int) -> None:
        notify(_resume_line(attempt, error, committed))

    async with connection.uploads() as client:
        with progress:
            return await client.upload(
                source,
                progress=on_progress,
                on_upload_id=announce,
                on_retry=on_retry,
                retry_policy=_retry_policy(outage_tolerance),
                **options,
            )


async def _call(connection: _Connection, method: Callable[[UploadClient], Awaitable[T]]) -> T:
    async with connection.uploads() as client:
        return await method(client)


async def _admin(connection: _Connection, method: Callable[[CredentialsAdmin], Awaitable[T]]) -> T:
    async with connection.admin() as admin:
        return await method(admin)


def _view_fields(view: CredentialsView) -> dict[str, object]:
    target = view.target
    return {
        "tenant_id": view.tenant_id,
        "version": view.version,
        "update_time": _time(view.update_time),
        "access_key_id_hint": view.access_key_id_hint,
        "region": target.region,
        "bucket": target.bucket,
        "prefix": target.prefix,
        "endpoint_url": target.endpoint_url,
        "force_path_style": target.force_path_style,
        "sse": target.sse,
        "kms_key_id": target.kms_key_id,
        "allow_overwrite": target.allow_overwrite,
        "equal_part_sizes": target.equal_part_sizes,
        "expected_bucket_owner": target.expected_bucket_owner,
        "abandoned_uploads": target.abandoned_uploads,
        "role_arn": view.role_arn,
        "external_id": view.external_id,
        "trusted_principal": view.trusted_principal,
    }


def _print_view(view: CredentialsView, json_output: bool) -> None:
    fields = _view_fields(view)
    if json_output:
        _print_json(fields)
    else:
        _print_fields(fields)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _read_secret(secret_stdin: bool) -> str:
    if secret_stdin and not _stdin_is_tty():
        secret = sys.stdin.readline().rstrip("\r\n")
    elif SECRET_ENV in os.environ and not secret_stdin:
        secret = os.environ[SECRET_ENV]
    elif _stdin_is_tty():
        # Typed by hand: never echoed, also with --secret-stdin.
        secret = str(typer.prompt("Secret access key", hide_input=True))
    else:
        _fail(
            f"no secret access key: pass --secret-stdin, set {SECRET_ENV}, "
            "or run in a terminal to be prompted",
            EXIT_USAGE,
        )
    secret = secret.strip()
    if not secret:
        _fail("the secret access key is empty", EXIT_USAGE)
    return secret


def register(app: typer.Typer) -> None:
    """Add the client commands to a `recgw` app."""
    app.command("upload", context_settings=_EXTRA_ARGS)(upload_command)
    app.command("status", context_settings=_EXTRA_ARGS)(status_command)
    app.command("abort", context_settings=_EXTRA_ARGS)(abort_command)
    app.command("salvage", context_settings=_EXTRA_ARGS)(salvage_command)
    creds = typer.Typer(
        help="Store, describe, verify and delete a tenant's S3 credentials (role admin).",
        no_args_is_help=True,
    )
    creds.command("set", context_settings=_EXTRA_ARGS)(creds_set_command)
    creds.command("describe", context_settings=_EXTRA_ARGS)(creds_describe_command)
    creds.command("delete", context_settings=_EXTRA_ARGS)(creds_delete_command)
    creds.command("verify", context_settings=_EXTRA_ARGS)(creds_verify_command)
    app.add_typer(creds, name="creds")


def load_plugins(app: typer.Typer) -> None:
    """Add the commands of every installed `recgw.commands` plugin (e.g. the gateway's)."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()(app)
        except Exception as err:  # the client commands must work even so
            typer.echo(
                f"warning: the recgw commands of {entry.value} could not be loaded: "
                f"{type(err).__name__}: {err}",
                err=True,
            )


def make_app(plugins: bool = True) -> typer.Typer:
    """The `recgw` app: the client commands and, with ``plugins``, those of plugins."""
    app = typer.Typer(
        help="recgw: stream call recordings into the customer's S3 bucket through the gateway.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    register(app)
    if plugins:
        load_plugins(app)
    return app


def upload_command(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE|-",
            help="File to upload, or - to stream stdin (e.g. a recorder's output as it records).",
        ),
    ],
    tenant: TenantOption,
    name: Annotated[
        str,
        typer.Option(
            "--name", help="Object name under the tenant's prefix, e.g. 2026/11/28/call-42.webm."
        ),
    ],
    content_type: Annotated[
        str | None,
        typer.Option(
            "--content-type",
            help="MIME type. Default: guessed from --name, else application/octet-stream.",
        ),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", metavar="KEY=VALUE", help="User metadata; repeat for more."),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option("--size", help="Total size in bytes, if known (automatic for a file)."),
    ] = None,
    chunk_size: Annotated[
        str, typer.Option("--chunk-size", help="Bytes per message, e.g. 256KiB (max 4MiB).")
    ] = "1MiB",
    upload_id: Annotated[
        str | None,
        typer.Option(
            "--upload-id",
            help="Client-chosen upload id (a UUID). If it names an upload that has bytes "
            "committed (an earlier run died), the upload continues from there: FILE must then "
            "hold the whole object, or be - with --source-offset.",
        ),
    ] = None,
    source_offset: Annotated[
        str,
        typer.Option(
            "--source-offset",
            help="The input holds the object's bytes from this byte on (with --upload-id, to "
            "finish an upload from a pipe; no whole-object checksums then).",
        ),
    ] = "0",
    checksums: Annotated[
        bool,
        typer.Option(
            "--checksums/--no-checksums",
            help="Send CRC32C and SHA-256 for the gateway to verify (costs CPU).",
        ),
    ] = True,
    outage_tolerance: Annotated[
        float,
        typer.Option(
            "--outage-tolerance",
            min=0,
            metavar="SECONDS",
            help="Give up after this long without the gateway committing more bytes; until "
            "then a lost connection or an unavailable gateway is retried. 0: never retry.",
        ),
    ] = recgw_client.DEFAULT_OUTAGE_TOLERANCE,
    retain_limit: Annotated[
        str,
        typer.Option(
            "--retain-limit",
            help="Memory for bytes sent but not yet committed by the gateway, e.g. 64MiB.",
        ),
    ] = "64MiB",
    spill_limit: Annotated[
        str,
        typer.Option(
            "--spill-limit",
            help="Disk for such bytes beyond --retain-limit while a live input (stdin, a pipe) "
            "outpaces the gateway, e.g. during an outage; reaching it fails the upload. "
            "0: make the input wait instead.",
        ),
    ] = "1GiB",
    spill_dir: Annotated[
        Path | None,
        typer.Option(
            "--spill-dir",
            exists=True,
            file_okay=False,
            writable=True,
            help="Where the private spill file goes (default: $TMPDIR or /tmp).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Stream a file or stdin into the tenant's bucket (role uploader).

    A lost connection or an unavailable gateway does not lose the upload: it
    resumes on a new stream from the gateway's committed size, printing one
    line to stderr per retry, for up to --outage-tolerance seconds without
    progress. stdin is read as it comes also meanwhile (beyond --retain-limit
    into a private temporary file), so a recorder never has to wait. If this
    command dies, run it again with the same --upload-id to finish the upload.
    """
    _reject_extra_args(ctx)
    expected_size = _parse_size(size, "--size") if size is not None else None
    chunk = _parse_size(chunk_size, "--chunk-size")
    offset = _parse_size(source_offset, "--source-offset")
    if offset and upload_id is None:
        raise typer.BadParameter("needs --upload-id", param_hint="--source-offset")
    retain = _parse_size(retain_limit, "--retain-limit")
    if retain < chunk:
        raise typer.BadParameter("must be at least --chunk-size", param_hint="--retain-limit")
    spill = _parse_size(spill_limit, "--spill-limit")
    if not 0 < chunk <= recgw_client.MAX_CHUNK_SIZE:
        raise typer.BadParameter("must be between 1 byte and 4MiB", param_hint="--chunk-size")
    metadata = _parse_metadata(meta or [])
    if content_type is None:
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if file != "-" and not os.path.exists(file):
        _fail(f"no such file: {file}", EXIT_USAGE)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    total = _known_size(file, expected_size)
    progress = _progress(total is not None, quiet)

    def announce(new_id: str) -> None:
        # Printed at once so that an interrupted upload can be looked up later.
        progress.console.print(f"upload id: {new_id}", markup=False, highlight=False)

    def notify(line: str) -> None:
        # A warning, printed also with --quiet; above the progress bar otherwise.
        if quiet:
            typer.echo(line, err=True)
        else:
            progress.console.print(line, markup=False, highlight=False)

    result = _run(
        _upload(
            connection,
            file,
            progress=progress,
            announce=announce,
            notify=notify,
            outage_tolerance=outage_tolerance,
            tenant_id=tenant,
            object_name=name,
            content_type=content_type,
            metadata=metadata,
            expected_size=expected_size,
            upload_id=upload_id,
            source_offset=offset,
            chunk_size=chunk,
            compute_checksums=checksums,
            retain_limit=retain,
            spill_limit=spill,
            spill_dir=spill_dir,
        ),
        json_output=json_output,
        hint=lambda err: _upload_hint(err, outage_tolerance),
    )
    if json_output:
        _print_json(_result_fields(result))
    else:
        _print_fields(_result_fields(result), title=f"uploaded s3://{result.bucket}/{result.key}")


def _upload_hint(err: RecgwError, outage_tolerance: float) -> str:
    """What to do about a failed upload, for people."""
    if err.reason == SOURCE_NOT_SEEKABLE:
        committed = err.committed_size()
        return (
            f"; give the recording's file instead of -, or pipe its bytes from byte {committed} "
            f"on with --source-offset {committed}"
        )
    if is_retryable(err):
        return (
            f"; no progress for {outage_tolerance:g} s, so the upload was left open: run the "
            "same command with --upload-id to finish it"
        )
    return ""


def _status_fields(status: UploadStatus) -> dict[str, object]:
    return {
        "upload_id": status.upload_id,
        "state": status.state.name,
        "tenant_id": status.tenant_id,
        "key": status.key,
        "committed_size": status.committed_size,
        "received_size": status.received_size,
        "error_message": status.error_message,
        "create_time": _time(status.create_time),
        "update_time": _time(status.update_time),
        "result": _result_fields(status.result) if status.result is not None else None,
    }


def status_command(
    ctx: typer.Context,
    upload_id: Annotated[str, typer.Argument(help="The upload id.")],
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Show the state and committed size of an upload (role uploader)."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    status = _run(
        _call(connection, lambda c: c.get_upload_status(upload_id)), json_output=json_output
    )
    fields = _status_fields(status)
    if json_output:
        _print_json(fields)
        return
    result = fields.pop("result")
    if isinstance(result, dict):
        fields |= {k: v for k, v in result.items() if k not in fields}
    _print_fields(fields)


def abort_command(
    ctx: typer.Context,
    upload_id: Annotated[str, typer.Argument(help="The upload id.")],
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Cancel an upload; nothing of it becomes visible (role uploader)."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    aborted: AbortResult = _run(
        _call(connection, lambda c: c.abort_upload(upload_id)), json_output=json_output
    )
    fields = {
        "state": aborted.state.name,
        "storage_aborted": aborted.storage_aborted,
        "detail": aborted.detail,
    }
    if json_output:
        _print_json(fields)
    else:
        _print_fields(fields)


def salvage_command(
    ctx: typer.Context,
    upload_id: Annotated[str, typer.Argument(help="The upload id.")],
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Keep what an open upload has committed as an object, e.g. after its recorder died."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    salvaged = _run(
        _call(connection, lambda c: c.salvage_upload(upload_id)), json_output=json_output
    )
    fields: dict[str, object] = {"state": salvaged.state.name}
    if salvaged.result is not None:
        fields |= _result_fields(salvaged.result)
    if json_output:
        _print_json(fields)
    else:
        _print_fields(fields)


def creds_set_command(
    ctx: typer.Context,
    tenant: TenantOption,
    bucket: Annotated[
        str, typer.Option("--bucket", help="Bucket name, access point alias or access point ARN.")
    ],
    access_key_id: Annotated[
        str, typer.Option("--access-key-id", help="AWS access key id (not with --role-arn).")
    ] = "",
    role_arn: Annotated[
        str,
        typer.Option(
            "--role-arn", help="IAM role the gateway assumes instead of keys; no secret needed."
        ),
    ] = "",
    rotate_external_id: Annotated[
        bool,
        typer.Option("--rotate-external-id", help="Give the tenant a new external id."),
    ] = False,
    region: Annotated[
        str, typer.Option("--region", help="AWS region, e.g. us-west-1; empty: found.")
    ] = "",
    expected_bucket_owner: Annotated[
        str,
        typer.Option("--expected-bucket-owner", help="Account id that must own the bucket."),
    ] = "",
    prefix: Annotated[
        str, typer.Option("--prefix", help="Key prefix of every object; ends with /.")
    ] = "uploads/",
    endpoint_url: Annotated[
        str, typer.Option("--endpoint-url", help="Endpoint of an S3-compatible store.")
    ] = "",
    path_style: Annotated[
        bool, typer.Option("--path-style", help="Path-style addressing (S3-compatible stores).")
    ] = False,
    sse: Annotated[
        SseMode | None, typer.Option("--sse", help="Server-side encryption; default: the bucket's.")
    ] = None,
    kms_key_id: Annotated[
        str, typer.Option("--kms-key-id", help="KMS key id or ARN, with --sse aws:kms.")
    ] = "",
    allow_overwrite: Annotated[
        bool,
        typer.Option("--allow-overwrite", help="Allow overwriting objects (no If-None-Match)."),
    ] = False,
    equal_part_sizes: Annotated[
        bool, typer.Option("--equal-part-sizes", help="Equal-size parts, for stores that need it.")
    ] = False,
    abandoned_uploads: Annotated[
        AbandonedMode | None,
        typer.Option(
            "--abandoned-uploads",
            help="An upload whose writer never comes back: abort (nothing visible; the "
            "default) or salvage (what was recorded becomes the object).",
        ),
    ] = None,
    secret_stdin: Annotated[
        bool,
        typer.Option(
            "--secret-stdin",
            help=f"Read the secret access key as one line from stdin. Otherwise it comes from "
            f"{SECRET_ENV} or a hidden prompt; never from the command line.",
        ),
    ] = False,
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Create or overwrite a tenant's S3 credentials: an access key pair or a role."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    if role_arn and access_key_id:
        _fail("give either --role-arn or --access-key-id, not both", EXIT_USAGE)
    if not role_arn and not access_key_id:
        _fail("give --access-key-id (with the secret) or --role-arn", EXIT_USAGE)
    secret = "" if role_arn else _read_secret(secret_stdin)
    view = _run(
        _admin(
            connection,
            lambda a: a.set(
                tenant,
                access_key_id,
                secret,
                region,
                bucket,
                role_arn=role_arn,
                rotate_external_id=rotate_external_id,
                expected_bucket_owner=expected_bucket_owner,
                prefix=prefix,
                endpoint_url=endpoint_url,
                force_path_style=path_style,
                sse=None if sse is None else _SSE[sse],
                kms_key_id=kms_key_id,
                allow_overwrite=allow_overwrite,
                equal_part_sizes=equal_part_sizes,
                abandoned_uploads=None if abandoned_uploads is None else abandoned_uploads.value,
            ),
        ),
        json_output=json_output,
    )
    _print_view(view, json_output)


def creds_describe_command(
    ctx: typer.Context,
    tenant: TenantOption,
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Show a tenant's stored credentials, without the secret."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    view = _run(_admin(connection, lambda a: a.describe(tenant)), json_output=json_output)
    _print_view(view, json_output)


def creds_delete_command(
    ctx: typer.Context,
    tenant: TenantOption,
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Delete a tenant's credentials, all versions."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    _run(_admin(connection, lambda a: a.delete(tenant)), json_output=json_output)
    if json_output:
        _print_json({"tenant_id": tenant, "deleted": True})
    else:
        typer.echo(f"deleted the credentials of {tenant}")


def creds_verify_command(
    ctx: typer.Context,
    tenant: TenantOption,
    json_output: JsonOption = False,
    address: AddressOption = DEFAULT_ADDRESS,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    plaintext: PlaintextOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    server_name: ServerNameOption = None,
) -> None:
    """Check everything the tenant's uploads need (the setup doctor); exit 1 if anything fails."""
    _reject_extra_args(ctx)
    connection = _connection(
        address,
        token_file,
        _Security(tls, plaintext, ca_file, cert_file, key_file, server_name),
    )
    verified = _run(_admin(connection, lambda a: a.verify(tenant)), json_output=json_output)
    fields = {
        "ok": verified.ok,
        "key": verified.key,
        "bucket_region": verified.bucket_region,
        "error_code": verified.error_code,
        "error_message": verified.error_message,
    }
    if json_output:
        _print_json({**fields, "checks": [dataclasses.asdict(c) for c in verified.checks]})
    else:
        _print_fields(fields)
        for check in verified.checks:
            typer.echo(f"{check.result.upper():<7}  {check.name}  ({check.operation})")
            for label, text in (
                ("error", check.error_code),
                ("missing", check.missing_permission),
                ("fix", check.fix),
                ("detail", check.detail),
            ):
                if text and (label != "detail" or check.result != "failed"):
                    typer.echo(f"         {label}: {text}")
    if not verified.ok:
        raise typer.Exit(EXIT_FAILURE)
