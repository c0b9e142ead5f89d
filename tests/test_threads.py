"""CPU thread sizing: affinity, cgroup v2 / v1 quotas and SSAE_THREADS (fake cgroup trees in tmp_path)."""
from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from ssae_common.core import runtime
from ssae_common.core.errors import BadInput


def fake_affinity(monkeypatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def own_cgroup(monkeypatch):
    def set_path(path: str) -> None:
        monkeypatch.setattr(runtime, "_own_cgroup_v2", lambda: path)

    set_path("/")
    return set_path


def test_affinity_without_quota(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 6)
    write(tmp_path / "cpu.max", "max 100000\n")
    assert runtime.available_cpus(str(tmp_path)) == 6


def test_cgroup_v2_quota_caps_and_rounds_down(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 16)
    write(tmp_path / "cpu.max", "250000 100000\n")  # 2.5 CPUs
    assert runtime.available_cpus(str(tmp_path)) == 2


def test_cgroup_v2_tightest_ancestor(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 16)
    own_cgroup("/user.slice/job")
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "user.slice" / "cpu.max", "300000 100000\n")
    write(tmp_path / "user.slice" / "job" / "cpu.max", "800000 100000\n")
    assert runtime.available_cpus(str(tmp_path)) == 3


def test_quota_below_one_cpu_gives_one(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 4)
    write(tmp_path / "cpu.max", "50000 100000\n")
    assert runtime.available_cpus(str(tmp_path)) == 1


def test_affinity_smaller_than_quota(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 2)
    write(tmp_path / "cpu.max", "800000 100000\n")
    assert runtime.available_cpus(str(tmp_path)) == 2


def test_cgroup_v1_quota(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 8)
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert runtime.available_cpus(str(tmp_path)) == 3
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert runtime.available_cpus(str(tmp_path)) == 8


def test_ssae_threads_overrides(monkeypatch, tmp_path, own_cgroup):
    fake_affinity(monkeypatch, 8)
    write(tmp_path / "cpu.max", "200000 100000\n")
    assert runtime.thread_count({"SSAE_THREADS": "5"}, str(tmp_path)) == 5
    assert runtime.thread_count({}, str(tmp_path)) == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_ssae_threads(value):
    with pytest.raises(BadInput, match=f"SSAE_THREADS={value}: expected a positive number"):
        runtime.thread_count({"SSAE_THREADS": value})


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads({"SSAE_THREADS": "1"}) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_tool_refuses_bad_ssae_threads_before_work(tmp_path):
    from ssae_tools.fit import main

    result = CliRunner().invoke(main, [str(tmp_path / "missing.h5")], env={"SSAE_THREADS": "zero"})
    assert result.exit_code == 2
    assert "SSAE_THREADS=zero: expected a positive number of CPU threads" in result.output


def test_ssae_threads_is_not_a_typo(tmp_path):
    from ssae_tools.base import check_environment

    check_environment("fit", {"SSAE_THREADS": "2"})
    with pytest.raises(BadInput, match="did you mean SSAE_THREADS"):
        check_environment("fit", {"SSAE_THREAD": "2"})
