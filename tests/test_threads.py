"""CPU thread choice: the decision logic with a fake probe and clock, and the real probe once."""

from __future__ import annotations

import pytest
import torch

from lorakit.base.threads import (
    ThreadTuner,
    available_cpus,
    candidates,
    matmul_probe,
    runnable_elsewhere,
    tuner_for,
)


class FakeCpu:
    """Probe speeds by thread count and a run queue that change when another process starts or stops."""

    def __init__(self) -> None:
        self.contended = False
        self.visible = True  # whether the other process shows in the run queue (not another VM's)
        self.now = 0.0
        self.set_to: list[int] = []
        self.probes = 0

    def probe(self, threads: int) -> float:
        self.probes += 1
        if self.contended:  # a pool wider than the free cores waits on its slowest thread
            return {1: 100.0, 2: 12.0, 4: 5.0}[threads]
        return {1: 100.0, 2: 180.0, 4: 300.0}[threads]

    def busy(self) -> int | None:
        return 1 if self.contended and self.visible else 0

    def clock(self) -> float:
        return self.now


def make(fake: FakeCpu, cpus: int = 4, lines: list[str] | None = None, default: int = 4) -> ThreadTuner:
    return ThreadTuner(cpus, interval_s=30, probe=fake.probe, busy=fake.busy, set_threads=fake.set_to.append,
                       clock=fake.clock, log=None if lines is None else lines.append, default=default)


def steps(tuner: ThreadTuner, fake: FakeCpu, n: int, seconds: float, every: float = 1.0) -> None:
    for _ in range(n):
        fake.now += every
        tuner.after_step(1000, seconds)


def test_candidates():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(16) == [1, 2, 4, 8, 16]
    assert 1 <= available_cpus() <= (torch.get_num_threads() or 1) * 64


def test_idle_machine_keeps_pytorchs_pool_untouched_and_says_so():
    # Idle, the run is PyTorch's default run: no probe, no set_num_threads, ever.
    fake, lines = FakeCpu(), []
    tuner = make(fake, lines=lines)
    assert tuner.start() == 4
    steps(tuner, fake, 100, 2.0)
    assert fake.probes == 0 and fake.set_to == []
    assert lines == ["CPU threads: 4 of 4 available (start; no other process is running: PyTorch's own pool, unchanged)"]
    tuner.close()
    assert fake.set_to == []


def test_contention_in_the_run_queue_falls_back_to_one_thread_and_recovers():
    fake, lines = FakeCpu(), []
    tuner = make(fake, lines=lines)
    tuner.start()
    steps(tuner, fake, 5, 2.0)
    # Another process starts: the next look at the run queue probes, before any step slows down.
    fake.contended = True
    steps(tuner, fake, 1, 2.0)
    assert tuner.threads == 1 and fake.set_to == [1] and fake.probes == 3
    assert lines[-1] == "CPU threads: 1 of 4 available (1 other thread ready to run; probe speed by thread count " \
        "1: 1.00, 2: 0.12, 4: 0.05)"
    # While it runs: a probe every 30 s, not every step.
    steps(tuner, fake, 45, 2.0)
    assert fake.probes == 6 and tuner.threads == 1
    # It stops: back to PyTorch's own count at the next look, without probing.
    fake.contended = False
    steps(tuner, fake, 1, 2.0)
    assert tuner.threads == 4 and fake.set_to == [1, 4] and fake.probes == 6
    assert "no other process is running any more" in lines[-1]
    assert [d[0] for d in tuner.decisions] == [1, 1]


def test_contention_the_run_queue_cannot_see_is_caught_by_the_step_time():
    fake, lines = FakeCpu(), []
    tuner = make(fake, lines=lines)
    tuner.start()
    steps(tuner, fake, 3, 2.0)
    fake.contended, fake.visible = True, False  # another VM on the same host, say
    steps(tuner, fake, 1, 20.0)
    assert tuner.threads == 1 and "steps slowed down" in lines[-1]
    # The run queue says idle, but that is not why it was reduced: only a probe brings it back.
    steps(tuner, fake, 10, 2.0)
    assert tuner.threads == 1
    fake.contended = False
    steps(tuner, fake, 25, 2.0)
    assert tuner.threads == 4 and "periodic check" in lines[-1]
    steps(tuner, fake, 40, 2.0)  # idle again: no more probes
    assert len(tuner.decisions) == 2


def test_busy_machine_at_start_probes_and_unknown_run_queue_probes_periodically():
    fake, lines = FakeCpu(), []
    fake.contended = True
    tuner = make(fake, lines=lines)
    assert tuner.start() == 1 and lines[0].startswith("CPU threads: 1 of 4 available (start; 1 other thread ready")
    unknown = ThreadTuner(4, interval_s=30, probe=fake.probe, busy=lambda: None, set_threads=fake.set_to.append,
                          clock=fake.clock, default=4)
    unknown.start()
    before = len(unknown.decisions)
    steps(unknown, fake, 31, 2.0)
    assert len(unknown.decisions) == before + 1  # the periodic check, as before the run queue was read
    # PyTorch's count differs from the CPUs available (a cgroup quota): probed, never taken as is.
    quota = make(FakeCpu(), default=64)
    assert quota.start() == 4 and quota.decisions


def test_ties_go_to_fewer_threads():
    tuner = ThreadTuner(2, probe=lambda n: 50.0, set_threads=lambda n: None, busy=lambda: 1, default=2)
    assert tuner.start() == 1


def test_run_queue_counts_other_processes():
    import subprocess
    import sys
    import time

    others = runnable_elsewhere()
    assert others is not None and others >= 0
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        # Both spin without pause: runnable whether or not they hold a CPU now (the least of 3 readings).
        assert min(runnable_elsewhere() for _ in range(5)) >= 2
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def test_environment_pins_the_count_and_close_restores_it(monkeypatch):
    before = torch.get_num_threads()
    lines: list[str] = []
    monkeypatch.setenv("LORAKIT_THREADS", "1")
    tuner = tuner_for(torch.device("cpu"), False, lines.append)
    try:
        assert tuner is not None and tuner.threads == 1 and torch.get_num_threads() == 1
        assert lines == ["CPU threads: 1 (set by the environment)"]
        tuner.after_step(10, 100.0)  # far slower: a pinned count is never re-probed
        assert torch.get_num_threads() == 1 and len(lines) == 1
    finally:
        tuner.close()
    assert torch.get_num_threads() == before
    monkeypatch.setenv("LORAKIT_THREADS", "two")
    with pytest.raises(ValueError, match="LORAKIT_THREADS must be a positive integer, got 'two'"):
        tuner_for(torch.device("cpu"), False, lines.append)
    assert tuner_for(torch.device("meta"), False, lines.append) is None


def test_real_probe_restores_the_thread_count():
    before = torch.get_num_threads()
    assert matmul_probe(1, budget_s=0.01) > 0
    assert torch.get_num_threads() == before
