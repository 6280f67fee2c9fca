"""Ctrl-C stops training even when Python swallows the KeyboardInterrupt: one that
lands in a finalizer (`__del__`) is only printed ("Exception ignored in ..."), which
happened to a real run interrupted while its model loaded."""

from __future__ import annotations

import os
import signal
import time

from hybridserve.finetune.trainer import _ctrl_c_latch


def test_a_ctrl_c_swallowed_by_a_finalizer_is_still_seen():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here, inside __del__, and its raise is dropped

    with _ctrl_c_latch() as interrupted:
        assert not interrupted()
        Finalizer()  # collected at once: the KeyboardInterrupt never reaches this frame
        assert interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_a_ctrl_c_nothing_is_latched():
    with _ctrl_c_latch() as interrupted:
        assert not interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
