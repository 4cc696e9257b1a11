"""Run by tests/test_distributed.py under torchrun (or with the torchrun environment variables set
by hand): meta-trains with build_engine on every rank and saves what each rank ended with."""

import argparse
import os
import time

import torch
from torch import nn

from bilevel_maml import build_engine, distributed
from conftest import random_classification_source, tasks_in_batch

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--iterations", type=int, default=3)
parser.add_argument("--meta-batch-size", type=int, default=8)
parser.add_argument("--runs", nargs="+", default=["maml:per-task"], help="algorithm:per-task|vectorized")
parser.add_argument("--timeout", type=float, default=60.0)
parser.add_argument("--misbehave", choices=["die", "hang"], help="what the last rank does at iteration 2")
args = parser.parse_args()

distributed.init_from_environment(torch.device("cpu"), args.timeout)
rank, world_size = distributed.world()


class Misbehave:
    def on_iteration_end(self, engine, metrics):
        if engine.meta_iteration == 2 and engine.rank == engine.world_size - 1:
            if args.misbehave == "die":
                os._exit(3)
            time.sleep(3600)


saved = {}
for run in args.runs:
    algorithm, path = run.split(":")
    torch.manual_seed(0)
    options = None
    if algorithm == "maml++":  # per-step BatchNorm statistics are summed over the ranks too
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.Tanh(),
                              nn.Linear(16, 5)).double()
        options = {"per_step_bn_statistics": True}
    else:
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    engine = build_engine(algorithm, model, random_classification_source(5, 2, 6), ways=5, shots=1,
                          inner_steps=2, inner_lr=0.3, meta_lr=0.01, meta_batch_size=args.meta_batch_size,
                          meta_iterations=args.iterations, valid_step=10**6, seed=5,
                          vectorize=path == "vectorized", algorithm_options=options)
    assert engine.vectorized == (path == "vectorized")
    served = []
    env_step = engine.env.step

    def recording_step(env=engine.env, served=served, env_step=env_step):
        env_step()
        served += [{"support": support, "query": query} for support, query in tasks_in_batch(env)]

    engine.env.step = recording_step
    if args.misbehave:
        engine.callbacks.append(Misbehave())
    engine.run()
    saved[run] = {"theta": [p.detach().clone() for p in engine.meta_learner.trainable_parameters()],
                  "tasks": served, "local_meta_batch": engine.meta_batch_size,
                  "buffers": [b.detach().clone() for b in model.buffers()]}

torch.save(saved, os.path.join(args.out, f"rank{rank}.pt"))
distributed.shutdown(wait_for_the_others=True)
