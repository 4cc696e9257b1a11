"""``python pause_at.py K FOLDER -- ARGV`` (under torchrun): the console script's ``main(ARGV)``, with
every rank, as meta-iteration K ends, creating ``FOLDER/paused.<rank>`` and then waiting (at most
60 s) until ``FOLDER/go`` exists. A test that sends its signal while every rank is paused and only
then creates ``go`` knows the signal landed at iteration K, however slowly it polls."""

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
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


MetaEngine._call = _call
sys.exit(cli.main(sys.argv[split + 1:]))
