"""CPU thread choice: the decision logic with a fake probe and clock, and the real probe once."""

from __future__ import annotations

import pytest
import torch

from lorakit.threads import ThreadTuner, available_cpus, candidates, matmul_probe, tuner_for


class FakeCpu:
    """Probe speeds by thread count that change when another process starts or stops."""

    def __init__(self) -> None:
        self.contended = False
        self.now = 0.0
        self.set_to: list[int] = []
        self.probes = 0

    def probe(self, threads: int) -> float:
        self.probes += 1
        if self.contended:  # a pool wider than the free cores waits on its slowest thread
            return {1: 100.0, 2: 12.0, 4: 5.0}[threads]
        return {1: 100.0, 2: 180.0, 4: 300.0}[threads]

    def clock(self) -> float:
        return self.now


def make(fake: FakeCpu, cpus: int = 4, lines: list[str] | None = None) -> ThreadTuner:
    return ThreadTuner(cpus, interval_s=30, probe=fake.probe, set_threads=fake.set_to.append,
                       clock=fake.clock, log=None if lines is None else lines.append)


def test_candidates():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(16) == [1, 2, 4, 8, 16]
    assert 1 <= available_cpus() <= (torch.get_num_threads() or 1) * 64


def test_idle_machine_uses_every_cpu_and_says_so():
    fake, lines = FakeCpu(), []
    tuner = make(fake, lines=lines)
    assert tuner.choose() == 4 and fake.set_to == [4]
    assert lines == ["CPU threads: 4 of 4 available (start; probe speed by thread count 1: 0.33, 2: 0.60, 4: 1.00)"]


def test_contention_falls_back_to_one_thread_and_recovers():
    fake, lines = FakeCpu(), []
    tuner = make(fake, lines=lines)
    tuner.choose()
    for _ in range(5):  # steady steps: no probing between the periodic checks
        fake.now += 1
        tuner.after_step(1000, 2.0)
    assert fake.probes == 3
    # Another process starts: steps take 10x as long, and the next step re-probes at once.
    fake.contended = True
    fake.now += 1
    tuner.after_step(1000, 20.0)
    assert tuner.threads == 1 and fake.set_to[-1] == 1
    assert "CPU threads: 1 of 4 available (steps slowed down" in lines[-1]
    # It goes away: the periodic check notices and goes back to every core.
    fake.contended = False
    fake.now += 31
    tuner.after_step(1000, 5.0)
    assert tuner.threads == 4 and "periodic check" in lines[-1]
    assert [d[0] for d in tuner.decisions] == [4, 1, 4]


def test_ties_go_to_fewer_threads():
    tuner = ThreadTuner(2, probe=lambda n: 50.0, set_threads=lambda n: None)
    assert tuner.choose() == 1


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
