"""Tasks per second with 1 and 2 processes (torchrun, gloo on CPU / NCCL on CUDA), same global meta-batch.

Each configuration is launched with ``torchrun --nproc_per_node N``; every rank adapts
``meta_batch_size / N`` tasks and the meta-gradients are all-reduced before each outer step. The CPU
cores are split evenly between the processes (``OMP_NUM_THREADS``). Times are the median
meta-iteration after warm-up, measured on rank 0 (every rank waits at the all-reduce, so it is the
whole job's pace).

    .venv/bin/python benchmarks/distributed.py --json benchmarks/results/distributed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bilevel_maml import ALGORITHMS
from bilevel_maml.arguments import OneLineParser, device_name, non_negative_int, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data.omniglot import find_subsets
from bilevel_maml.execution import PRECISIONS, check_precision

HERE = Path(__file__).resolve()


def worker(args) -> None:
    import torch

    from bilevel_maml import build_engine, distributed
    from bilevel_maml.allocator import keep_freed_memory
    from bilevel_maml.data import omniglot_small_tasksets
    from bilevel_maml.models import Conv4

    keep_freed_memory()
    device = distributed.init_from_environment(torch.device(args.device))
    rank, world_size = distributed.world()
    torch.manual_seed(0)
    tasksets = omniglot_small_tasksets(args.data_root, ways=5, samples_per_class=1 + args.query)
    engine = build_engine(args.algorithm, Conv4(5), tasksets, ways=5, shots=1, query_shots=args.query,
                          inner_steps=args.inner_steps, meta_batch_size=args.meta_batch_size,
                          meta_iterations=10**9, valid_step=10**9, device=device, precision=args.precision)
    engine.train()
    times = []
    for i in range(args.warmup + args.iterations):
        distributed.barrier()
        started = time.perf_counter()
        engine.meta_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    if rank == 0:
        seconds = statistics.median(times)
        Path(args.worker_json).write_text(json.dumps(dict(
            processes=world_size, threads_per_process=torch.get_num_threads(), device=str(device),
            backend=torch.distributed.get_backend() if world_size > 1 else "none", precision=engine.precision,
            execution=engine.execution.name,
            tasks_per_rank=engine.meta_batch_size, vectorized=engine.vectorized,
            seconds_per_iteration=seconds, tasks_per_second=args.meta_batch_size / seconds)))
    distributed.shutdown(wait_for_the_others=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, args, forwarded: list[str]) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    threads = max(1, (os.cpu_count() or 1) // processes) if args.device == "cpu" else 1
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [torchrun, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), str(HERE), "--worker", "--worker-json", str(result), *forwarded]
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        return json.loads(result.read_text())


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="maml")
    parser.add_argument("--meta-batch-size", type=positive_int, default=32)
    parser.add_argument("--inner-steps", type=positive_int, default=1)
    parser.add_argument("--query", type=positive_int, default=1, help="query examples per class")
    parser.add_argument("--iterations", type=positive_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="of every configuration (default: tf32 on CUDA, fp32 on CPU)")
    parser.add_argument("--processes", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="write the measurements to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.precision = check_precision(args.precision, args.device)
    if args.worker:
        return worker(args)
    find_subsets(args.data_root)  # before any process starts
    forwarded = ["--data-root", str(Path(args.data_root).resolve()), "--algorithm", args.algorithm,
                 "--meta-batch-size", str(args.meta_batch_size), "--inner-steps", str(args.inner_steps),
                 "--query", str(args.query), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                 "--device", args.device, "--precision", args.precision]
    rows = []
    for processes in args.processes:
        row = launch(processes, args, forwarded)
        rows.append(row)
        print(f"{processes} process(es) × {row['threads_per_process']} thread(s), {row['backend']}: "
              f"{row['seconds_per_iteration']:.3f} s/meta-iteration, {row['tasks_per_second']:.1f} tasks/s "
              f"({row['tasks_per_rank']} tasks per rank, {row['execution']}, precision {row['precision']})", flush=True)
    for row in rows[1:]:
        print(f"{row['processes']} processes: {row['tasks_per_second'] / rows[0]['tasks_per_second']:.2f}× the "
              f"tasks/s of {rows[0]['processes']}", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_json", "json")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(kind="scaling", settings=settings, rows=rows), indent=2))


if __name__ == "__main__":
    run_script(main)
