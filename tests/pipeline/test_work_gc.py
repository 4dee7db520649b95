"""STATE/work's size limit: `collect_work_garbage` removes least recently used job folders (work/KIND/KEY), never
one a live process holds (`hold_folder`, as `fresh` does for every job a flow runs), and `mergeplan cache gc`
reports both limits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import task

from infra.cache import collect_work_garbage, folder_bytes, job_folder
from tasks.caching import fresh

HOLDER = """
import sys, time
from pathlib import Path
from infra.cache import hold_folder

hold_folder(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(120)  # a flow run still using the merge it made
"""


def job(work: Path, kind: str, key: str, megabytes: float, age_s: float) -> Path:
    folder = work / kind / key
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"\0" * int(megabytes * 1e6))
    os.utime(folder, (time.time() - age_s,) * 2)
    return folder


def test_least_recently_used_job_folders_go_first_and_held_ones_stay(tmp_path):
    work = tmp_path / "work"
    oldest = job(work, "merges", "a", 1, 400)
    older = job(work, "sweeps", "b", 1, 300)
    old = job(work, "merges", "c", 1, 200)
    new = job(work, "fits", "d", 1, 100)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(oldest)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        os.utime(oldest, (time.time() - 400,) * 2)  # hold_folder marked it used; make it the oldest again
        report = collect_work_garbage(work, int(2.5e6))
        assert report.held == ["merges/a"] and report.removed == ["sweeps/b", "merges/c"]
        assert oldest.is_dir() and new.is_dir() and not older.exists() and not old.exists()
        assert report.before_bytes == 4_000_000 and report.after_bytes == folder_bytes(work) == 2_000_000
    finally:
        holder.kill()
        holder.wait(30)
    assert collect_work_garbage(work, 1_500_000).removed == ["merges/a"]  # no holder now
    assert collect_work_garbage(work, 10**9).removed == []  # within the limit: nothing to do
    assert new.is_dir()


def test_fresh_holds_the_job_folder_for_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEPLAN_STATE_DIR", str(tmp_path))
    work = tmp_path / "work"
    folder = job(work, "merges", "k", 1, 500)

    class Job:
        cache_key = "k"
        output = folder / "model"

    @task
    def noop(job):
        return None

    assert job_folder(Job.output, work.resolve()) == folder.resolve()
    fresh(noop, Job())
    report = collect_work_garbage(work, 1)
    assert report.held == ["merges/k"] and folder.is_dir()


def test_cache_gc_command_reports_the_work_folder(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("MERGEPLAN_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MERGEPLAN_CACHE_DIR", str(tmp_path / "cache"))
    job(tmp_path / "work", "merges", "x", 1, 100)
    status, out, err = run_cli("cache", "gc", "--work-max-gb", "0.0005")
    assert status == 0, err
    assert f"{(tmp_path / 'work').resolve()}: 1.0 MB -> 0.0 MB (limit 0.0005 GB); 1 job folders removed" in out
    status, out, err = run_cli("cache", "gc", "--work-max-gb", "-1")
    assert status == 2 and err.startswith("error: --work-max-gb: the limit must be positive"), err
