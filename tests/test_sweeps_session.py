"""Sweeps, the driver's session: SIGTERM is handled like Ctrl-C while a sweep runs, and only then."""

import os
import signal

import pytest

from sweeps.run.session import sigterm_as_ctrl_c


def test_sigterm_goes_to_the_ctrl_c_handler_of_the_moment_and_the_old_handler_comes_back():
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    old_int = signal.signal(signal.SIGINT, lambda sig, frame: seen.append(sig))  # as Tune's, while it runs
    try:
        with sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # outside Tune: Python's own
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, old_int)
    assert seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before
