"""The slowdown arithmetic (worker/slowdown.py), on a fake clock."""

from geotrain.worker.slowdown import Slowdown


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def one_step(slow, clock, compute, sync_and_opt, wan=0.0):
    start = clock.t
    slow.start()
    clock.t += compute
    slow.before_sync()
    clock.t += sync_and_opt + wan
    slow.end(wan_s=wan)
    return clock.t - start


def test_rank0_stretches_its_whole_step_by_the_factor_after_the_first_step():
    clock = FakeClock()
    slow = Slowdown(3.0, rank=0, clock=clock, sleep=clock.sleep)
    first = one_step(slow, clock, compute=0.10, sync_and_opt=0.02)
    assert abs(first - (0.12 + 2 * 0.10)) < 1e-12  # the first step knows only its compute
    for _ in range(5):
        took = one_step(slow, clock, compute=0.10, sync_and_opt=0.02)
        assert abs(took - 3 * 0.12) < 1e-12
    assert abs(slow.slept_s - sum(clock.sleeps)) < 1e-12


def test_wan_waits_are_not_stretched():
    clock = FakeClock()
    slow = Slowdown(2.0, rank=0, clock=clock, sleep=clock.sleep)
    one_step(slow, clock, compute=0.1, sync_and_opt=0.05, wan=1.0)
    took = one_step(slow, clock, compute=0.1, sync_and_opt=0.05, wan=1.0)
    assert abs(took - (2 * 0.15 + 1.0)) < 1e-12


def test_other_ranks_and_full_speed_sites_never_sleep():
    for factor, rank in ((3.0, 1), (1.0, 0)):
        clock = FakeClock()
        slow = Slowdown(factor, rank=rank, clock=clock, sleep=clock.sleep)
        for _ in range(3):
            one_step(slow, clock, compute=0.1, sync_and_opt=0.05)
        assert clock.sleeps == [] and not slow.active

