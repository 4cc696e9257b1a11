"""``python pause_at.py K FOLDER -- ARGV`` (under torchrun): the console script's ``main(ARGV)``, with
every rank, as meta-iteration K ends, creating ``FOLDER/paused.<rank>`` and then waiting (at most
60 s) until it has been asked to stop (``engine.stop_signal`` set). torchrun starts its workers in
sessions of their own, so a terminal's Ctrl-C reaches torchrun alone, which forwards it to each worker
when it gets to it: a test that signals while every rank waits knows the stop lands at iteration K,
however slowly the machine runs."""

import sys
import time
from pathlib import Path

from bilevel_maml import cli
from bilevel_maml.engine import MetaEngine

split = sys.argv.index("--")
at, folder = int(sys.argv[1]), Path(sys.argv[2])
original = MetaEngine._call


def _call(self, hook, *args):
    original(self, hook, *args)
    if hook == "on_iteration_end" and self.meta_iteration == at:
        (folder / f"paused.{self.rank}").touch()
        deadline = time.monotonic() + 60
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.01)


MetaEngine._call = _call
sys.exit(cli.main(sys.argv[split + 1:]))
