"""The bench's judgement of its own figures (bench/report.py): which goals a run meets, when a
run's throughput is not to be trusted, and what the machine's CPU allows a ratio to reach."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report
from bench.common import MiB, Sample

SIZE = 512 * MiB


def sample(seconds: float, cpu: dict[str, float], other: float | None, load: float) -> Sample:
    return Sample(seconds, cpu, load, 0, other, 0.0 if other is not None else None)


def run_data(other: float | None, load: float = 1.0) -> dict[str, Any]:
    """A run of two CPU-bound paths on 2 cores: boto3 3.8 CPU ms/MiB in all, the gateway 5.6."""
    boto3 = [sample(1.0, {"client": 1.3 * 0.512, "store": 2.5 * 0.512}, other, load)] * 3
    cpu = {"client": 1.0 * 0.512, "gateway": 1.9 * 0.512, "store": 2.7 * 0.512}
    gateway = [sample(1.5, cpu, other, load)] * 3
    paths = {
        "direct_boto3": report.summarise(boto3, SIZE, report.PATHS["direct_boto3"]),
        "gateway": report.summarise(gateway, SIZE, report.PATHS["gateway"]),
    }
    return {
        "paths": paths,
        "ratios": report.ratios(paths),
        "config": {"median_load_average": load},
        "machine": {"nproc": 2},
    }


def test_a_cpu_bound_ratio_is_set_beside_what_the_machine_allows() -> None:
    data = run_data(other=0.0)
    goal = report.goals(data)[0]
    assert goal["goal"].startswith("gateway / direct boto3")
    assert goal["met"] is False and not goal["note"]
    assert goal["value"] == pytest.approx(1.0 / 1.5)
    bound = goal["cpu_bound"]
    assert bound["bound"] == pytest.approx(3.8 / 5.6)
    # 0.75 would need the whole gateway path at 3.8 / 0.75 ms/MiB: the gateway at 5.07 - 3.7.
    assert bound["uploader_cpu_needed"] == pytest.approx(3.8 / 0.75 - 3.7)
    assert bound["cores_busy"]["gateway"] == pytest.approx(512 / 1.5 * 5.6 / 1000)


def test_a_ratio_of_a_path_that_leaves_cores_idle_has_no_cpu_bound() -> None:
    data = run_data(other=0.0)
    for info in data["paths"].values():
        info["mib_per_s"]["median"] /= 2  # half the rate: about 0.95 cores busy
    assert report.goals(data)[0]["cpu_bound"] == {}


def test_other_processes_measured_beside_the_paths_make_ratios_unreliable() -> None:
    assert report.contention(run_data(other=0.05, load=3.5)) == ""  # load counts our threads
    busy = report.contention(run_data(other=0.6))
    assert "0.60 cores" in busy
    goal = report.goals(run_data(other=0.6))[0]
    assert goal["met"] is None and goal["note"] == f"unreliable: {busy}"
    # Without /proc/stat figures the load average is all there is.
    assert "load average was 3.5" in report.contention(run_data(other=None, load=3.5))


def test_memory_runs_show_whether_rss_grows_with_stream_length() -> None:
    from bench.bench import memory_runs

    assert memory_runs("64,500,64x64", 16) == ((64, 16 * MiB), (500, 16 * MiB), (64, 64 * MiB))

    def memory(streams: int, stream_mib: float, above: float) -> dict[str, Any]:
        return {
            "streams": streams,
            "stream_mib": stream_mib,
            "above_idle_mib": above,
            "budget_mib": 512,
            "stopped_by": "",
        }

    data = run_data(other=0.0)
    data["memory"] = [memory(64, 16, 280), memory(500, 16, 520), memory(64, 64, 380)]
    found = {g["goal"]: g for g in report.goals(data)}
    longer = found["64 streams x 64 MiB hold <= 64 MiB more than x 16 MiB"]
    assert longer["value"] == pytest.approx(100) and longer["met"] is False
    assert found["RSS above idle, 64 streams x 64 MiB <= budget + 64 MiB"]["met"] is True
    assert not [name for name in found if "500 streams x 16 MiB hold" in name]


def test_sha256_is_held_to_the_hashing_measured_beside_its_runs() -> None:
    data = run_data(other=0.0)
    cpu = {"client": 1.0 * 0.512, "gateway": 2.9 * 0.512, "store": 2.7 * 0.512}
    samples = [sample(1.8, cpu, 0.0, 1.0)] * 3
    data["paths"]["gateway_sha256"] = report.summarise(
        samples, SIZE, report.PATHS["gateway_sha256"]
    )
    data["machine"]["sha256_ms_per_mib"] = 0.5  # measured at the end: context only
    data["sha256_ms_per_mib_runs"] = [1.1, 0.9, 1.02]
    found = {g["goal"]: g for g in report.goals(data)}
    sha = found["SHA-256 adds <= hashing bytes from memory (CPU ms/MiB)"]
    assert sha["value"] == pytest.approx(1.0) and sha["target"] == 1.02 and sha["met"] is True
