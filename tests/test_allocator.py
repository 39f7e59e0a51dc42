"""The batch memory allocator: chosen before the process starts, the user's own choice left alone,
never passed on to the server; the processes really run with it (read from /proc/<pid>/maps).
Whole runs under it give the CSVs of a run without it: tests/test_experiments.py's torchrun tests."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from conftest import not_installed

from monai_sal_app import allocator
from monai_sal_app.__main__ import _command
from monai_sal_app.allocator import (
    ALLOCATOR_VARIABLE,
    GLIBC_TUNABLES,
    JEMALLOC_CONF,
    allocator_in_use,
    batch_allocator_for_children,
    batch_environment,
    jemalloc_library,
    without_batch_allocator,
)

CLEAN = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}


def installed_jemalloc():
    """The jemalloc library scripts/install.sh provides (a failure under CI when it is missing)."""
    library = jemalloc_library()
    if library is None:
        not_installed("jemalloc (Debian libjemalloc2, unpacked by scripts/install.sh into .data/jemalloc)")
    return library


def test_batch_work_gets_jemalloc_that_keeps_its_pages():
    library = installed_jemalloc()
    env = batch_environment(CLEAN)
    assert env["LD_PRELOAD"] == str(library) and env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env[ALLOCATOR_VARIABLE] == "jemalloc" and "GLIBC_TUNABLES" not in env
    assert {k: v for k, v in env.items() if k in CLEAN} == CLEAN


def test_without_jemalloc_glibc_gets_its_tunables(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    env = batch_environment(CLEAN)
    assert env["GLIBC_TUNABLES"] == GLIBC_TUNABLES and env[ALLOCATOR_VARIABLE] == "glibc-tunables"
    assert "LD_PRELOAD" not in env and "MALLOC_CONF" not in env


@pytest.mark.parametrize(
    "setting", [{"LD_PRELOAD": "/opt/libtcmalloc.so"}, {"MALLOC_CONF": "narenas:2"}, {"GLIBC_TUNABLES": "x=1"}]
)
def test_an_allocator_the_user_chose_is_left_alone(setting):
    env = batch_environment({**CLEAN, **setting})
    assert env == {**CLEAN, **setting, ALLOCATOR_VARIABLE: "user"}
    assert without_batch_allocator(env) == {**CLEAN, **setting}


def test_a_process_that_has_chosen_is_not_changed_again():
    env = batch_environment(CLEAN)
    assert batch_environment(env) == env


def test_the_server_is_started_without_the_batch_allocator():
    assert without_batch_allocator(batch_environment(CLEAN)) == CLEAN


@pytest.mark.parametrize(
    "argv, command",
    [(["demo", "--out", "x"], "demo"), (["--quiet", "serve", "--port", "1"], "serve"), (["--help"], None)],
)
def test_the_command_is_the_first_word_that_is_not_an_option(argv, command):
    assert _command(argv) == command


RESTART = (
    "from monai_sal_app.allocator import restart_with_batch_allocator, allocator_in_use\n"
    "import os\n"
    "print(os.getpid(), flush=True)\n"
    "restart_with_batch_allocator()\n"
    "print(os.getpid(), allocator_in_use(), os.environ.get('MONAI_SAL_ALLOCATOR'))\n"
)


def test_a_process_restarts_itself_once_with_jemalloc_loaded():
    installed_jemalloc()
    env = without_batch_allocator({k: v for k, v in os.environ.items() if k != ALLOCATOR_VARIABLE})
    result = subprocess.run(
        [sys.executable, "-c", RESTART], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    # The script runs twice in the same process (execve: same PID), and only twice; the second
    # time jemalloc is in its memory map, so it is really loaded.
    pid = result.stdout.split()[0]
    assert result.stdout.splitlines() == [pid, pid, f"{pid} jemalloc jemalloc"]


def test_the_monai_sal_command_is_the_entry_that_chooses_the_allocator():
    (script,) = entry_points(group="console_scripts", name="monai-sal")
    assert script.value == "monai_sal_app.__main__:main"


def _report_allocator(queue) -> None:
    queue.put(allocator_in_use())


def test_processes_started_for_batch_work_get_it_and_this_process_keeps_its_own():
    # What `serve` does to train its default models in parallel (spawned processes).
    installed_jemalloc()
    before = dict(os.environ)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with batch_allocator_for_children():
        child = context.Process(target=_report_allocator, args=(queue,))
        child.start()
    assert queue.get(timeout=120) == "jemalloc"
    child.join(30)
    assert dict(os.environ) == before and allocator_in_use() != "jemalloc"
