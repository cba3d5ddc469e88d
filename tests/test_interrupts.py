"""Ctrl-C and SIGTERM while the writer's threads run: handled between steps, never inside a lock.

A KeyboardInterrupt raised by a signal handler just after a queue's lock was taken leaves the lock held,
and the clean-up that follows hangs on it (a SIGTERM'd bake once hung this way in CI). Inside
interrupts.deferred() a signal only takes effect at interrupts.check()."""

import signal
import threading

import pytest
import torch

from ckptbend import interrupts, writer
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.provenance import output_metadata
from ckptbend.recipe import parse_recipe
from ckptbend.synth import write_checkpoint

RECIPE = parse_recipe('schema = 1\nname = "r"\n[unet.self]\nq = 1.1\n[unet.cross]\nv = 0.9\n')


def _interrupt_self(signum=signal.SIGINT):
    # Directed at this (the main) thread, so it is delivered before the call returns. os.kill on the
    # process may be delivered to any other thread (torch's pools, an earlier test's worker), later.
    signal.pthread_kill(threading.main_thread().ident, signum)


def test_a_signal_inside_deferred_takes_effect_at_check_not_before():
    q = __import__("queue").Queue()
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with q.mutex:               # a lock held, as inside Queue.get: no exception may land here
                _interrupt_self()
                for _ in range(10_000):     # many bytecodes: chances for a handler to run
                    pass
            assert not q.mutex.locked()
            interrupts.check()
            pytest.fail("check() did not raise")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_after_the_last_check_is_raised_on_leaving():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            _interrupt_self()
    with interrupts.deferred():     # nothing left over from the last block
        pass


def test_sigterm_goes_to_its_own_handler_and_ignored_signals_stay_ignored():
    seen = []
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.deferred():
            _interrupt_self(signal.SIGTERM)
            _interrupt_self(signal.SIGINT)      # ignored before: still ignored, nothing noted
            assert seen == []
            interrupts.check()
            assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def test_nested_deferred_keeps_deferring_until_the_outer_block_ends():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():
                pass
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            _interrupt_self()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    src = tmp_path_factory.mktemp("interrupt") / "in.safetensors"
    write_checkpoint(src, "sd1", size="tiny", dtype=torch.float16)
    ckpt = detect(src)
    return src, ckpt.files[0].header, make_plan(RECIPE, ckpt).edits_for(ckpt.files[0].rel)


class _Progress:
    def __init__(self, interrupt_at=None):
        self.updates, self.interrupt_at = 0, interrupt_at

    def update(self, n):
        self.updates += 1
        if self.updates == self.interrupt_at:
            _interrupt_self()


def _rewrite(tiny_sd1, out_path, progress, cached: bool, modelspec: bool):
    src, header, edits = tiny_sd1
    with open(out_path, "w+b") as out:
        # a ModelSpec hash_sha256 adds the worker that hashes the output's data behind the writer
        extra = {"modelspec.hash_sha256": "0x" + "0" * 64} if modelspec else {}
        meta = output_metadata({**header.metadata, **extra}, RECIPE, src.name)
        return writer.rewrite_file(src, header, edits, meta, out, progress,
                                   source_sha256="0" * 64 if cached else None)


@pytest.mark.parametrize("modelspec", [False, True], ids=["", "modelspec"])
@pytest.mark.parametrize("cached", [False, True], ids=["hash worker", "hash cached"])
def test_ctrl_c_at_any_step_of_the_writer_ends_it_cleanly(tiny_sd1, tmp_path, monkeypatch, cached, modelspec):
    """Ctrl-C at each progress step of a real rewrite (kernel copies, scaled tensors from the worker, the
    source hash on another): KeyboardInterrupt comes out of a check() between steps, every worker thread has ended, Ctrl-C's usual
    handler is back."""
    monkeypatch.setenv("CKPTBEND_HASH_CACHE", "0")
    steps = _Progress()
    _rewrite(tiny_sd1, tmp_path / "whole", steps, cached, modelspec)
    assert steps.updates > 5        # copies and scaled tensors interleave: several places to interrupt
    threads = set(threading.enumerate())
    for k in range(1, steps.updates + 1):
        with pytest.raises(KeyboardInterrupt) as raised:
            _rewrite(tiny_sd1, tmp_path / f"out{k}", _Progress(interrupt_at=k), cached, modelspec)
        # raised by a check() between steps, not wherever the main thread happened to be
        assert raised.traceback[-1].frame.code.raw is interrupts.check.__code__, raised.traceback[-1]
        assert set(threading.enumerate()) == threads, f"a worker thread outlived Ctrl-C at step {k}"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
