"""recgw-client installs on its own: its wheel in a fresh venv, with nothing but its declared
dependencies, runs `recgw upload` (no boto3, hvac or recgw-server anywhere in sight).

To stay fast and offline, the fresh venv gets no copies from PyPI: its site-packages has
links to exactly the distributions the wheel's metadata requires (with the `cli` extra,
resolved recursively from this environment), so an undeclared import fails there.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.test_client_unit import TOKEN, FakeServer, check_stream

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "python"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def requirements(requires: list[str] | None, extras: set[str]) -> list[str]:
    """The distribution names ``requires`` needs, markers evaluated for these extras."""
    names = []
    for line in requires or ():
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
            names.append(requirement.name)
            for extra in requirement.extras:
                names.extend(requirements(metadata.requires(requirement.name), {extra}))
    return names


def closure(roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = metadata.distribution(todo.pop()).metadata["Name"]
        if name in seen:
            continue
        seen.add(name)
        todo.extend(requirements(metadata.requires(name), set()))
    return seen


def link_distributions(names: set[str], target: Path) -> None:
    """Make every top-level file of these installed distributions visible in ``target``."""
    target.mkdir()
    for name in names:
        for file in metadata.distribution(name).files or ():
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            link = target / top
            if not link.exists():
                link.symlink_to(SITE_PACKAGES / top)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fresh")
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", root / "dist", CLIENT,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = (root / "dist").glob("recgw_client-*.whl")
    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "-q", f"{wheel}[cli]",
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    with zipfile.ZipFile(wheel) as archive:
        [info] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        declared = Parser().parsestr(archive.read(info).decode()).get_all("Requires-Dist")
    needed = closure(requirements(declared, {"cli"}))
    assert {"grpcio", "protobuf", "googleapis-common-protos", "google-crc32c"} <= needed
    assert {"typer", "rich"} <= needed
    assert not needed & {"boto3", "botocore", "hvac", "recgw-server", "recgw-client"}
    link_distributions(needed, root / "deps")
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(purelib.stdout.strip()) / "deps.pth").write_text(f"{root / 'deps'}\n")
    return venv


def test_the_wheel_declares_only_the_client_dependencies(fresh_venv: Path) -> None:
    python = fresh_venv / "bin" / "python"
    found = run(
        python,
        "-c",
        "import importlib.util as u; "
        "print([m for m in ('boto3', 'hvac', 'recgw_server', 'grpc', 'typer') if u.find_spec(m)])",
    )
    assert found.stdout.split() == ["['grpc',", "'typer']"], found.stderr
    # The library without the cli extra's modules, and the command's hint when they lack.
    without_cli = run(
        python,
        "-c",
        "import sys; sys.modules['typer'] = None; import recgw_client, recgw_client.sync; "
        "from recgw_client.cli import main; main()",
    )
    assert without_cli.returncode == 2
    assert "pip install 'recgw-client[cli]'" in without_cli.stderr
    shown = run(fresh_venv / "bin" / "recgw", "--help")
    assert shown.returncode == 0, shown.stderr
    for command in ("upload", "status", "abort", "salvage", "creds"):
        assert command in shown.stdout
    assert "serve" not in shown.stdout  # the gateway's commands come only with recgw-server


def test_recgw_upload_works_from_the_fresh_venv(fresh_venv: Path, tmp_path: Path) -> None:
    fake = FakeServer()
    fake.start()
    try:
        data = random.Random(1).randbytes(300_000)
        path = tmp_path / "call.webm"
        path.write_bytes(data)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "RECGW_ADDRESS": fake.address,
            "RECGW_TOKEN": TOKEN,
        }
        result = run(
            fresh_venv / "bin" / "recgw", "upload", path, "--tenant", "acme",
            "--name", "call.webm", "--json", "-q", env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["size"] == len(data)
        [stream] = fake.gateway.uploads
        check_stream(stream, data, expected_size=len(data))
    finally:
        fake.stop()
