"""``python self_signal.py K SIGNALS [DELAY] -- ARGV``: the console script's ``main(ARGV)``, with this
process sending itself each of SIGNALS (comma-separated names, DELAY seconds apart) as meta-iteration
K ends — a Ctrl-C or a scheduler's SIGTERM arriving at a known iteration. K = ``test``: as the final
test's evaluation begins."""

import os
import signal
import sys
import time

from bilevel_maml import cli
from bilevel_maml.engine import MetaEngine

split = sys.argv.index("--")
at, names = sys.argv[1], sys.argv[2].split(",")
delay = float(sys.argv[3]) if split > 3 else 0.0
original = MetaEngine._call


def send():
    for index, name in enumerate(names):
        if index:
            time.sleep(delay)
        os.kill(os.getpid(), getattr(signal, name))


def _call(self, hook, *args):
    original(self, hook, *args)
    if hook == "on_iteration_end" and str(self.meta_iteration) == at:
        send()


original_test = MetaEngine.test


def test(self, *args, **kwargs):
    if at == "test":
        send()
    return original_test(self, *args, **kwargs)


MetaEngine._call, MetaEngine.test = _call, test
# A Ctrl-C from a terminal meets Python's default handler; a suite started as a background job of a
# non-interactive shell would hand this process SIGINT ignored (and the CLI rightly keeps what it found)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(cli.main(sys.argv[split + 1:]))
