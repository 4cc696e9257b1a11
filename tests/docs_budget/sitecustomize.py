"""The small budget tests/test_docs.py runs the docs' code blocks with.

On PYTHONPATH, Python imports this module at start-up (``site``), before the block or command
runs: whatever a block asks for, a :class:`~bilevel_maml.engine.MetaEngine` then trains at most
``ITERATIONS`` meta-iterations, validates every ``VALID_EVERY`` on at most ``TASKS`` tasks, and
evaluates at most ``TASKS`` tasks, so that every block runs as written in seconds. Nothing else
changes: the blocks and commands are the ones the pages show.
"""

import functools

ITERATIONS, VALID_EVERY, TASKS = 3, 2, 10


def _shrink():
    from bilevel_maml.engine import MetaEngine

    build, evaluate = MetaEngine.__init__, MetaEngine.evaluate

    @functools.wraps(build)
    def small_init(self, *args, **kwargs):
        kwargs["meta_iterations"] = min(kwargs.get("meta_iterations", 1000), ITERATIONS)
        kwargs["valid_step"] = min(kwargs.get("valid_step", 100), VALID_EVERY)
        kwargs["valid_tasks"] = min(kwargs.get("valid_tasks", 100), TASKS)
        build(self, *args, **kwargs)

    @functools.wraps(evaluate)
    def small_evaluate(self, env, num_tasks, *args, **kwargs):
        return evaluate(self, env, min(num_tasks, TASKS), *args, **kwargs)

    MetaEngine.__init__, MetaEngine.evaluate = small_init, small_evaluate


_shrink()
