"""``bilevel-maml``: train, evaluate and resume meta-learning runs from the command line.

    bilevel-maml train --algorithm maml --dataset omniglot-small --ways 5 --shots 1 --output runs/maml
    bilevel-maml evaluate --output runs/maml            # accuracy ± 95% CI over 600 test tasks
    bilevel-maml resume --output runs/maml --iterations 2000
    bilevel-maml bench --steps 1 5                      # meta-iteration speed vs learn2learn (and JAX)
    torchrun --nproc_per_node 2 -m bilevel_maml train --meta-batch-size 32 --output runs/maml-2p

A run folder holds ``config.json``, ``checkpoints/last.pt`` and ``checkpoints/best.pt``, the
offline W&B run under ``wandb/`` and ``result.json`` / ``evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import torch

from bilevel_maml import distributed
from bilevel_maml.allocator import keep_freed_memory
from bilevel_maml.builder import OPTIMIZERS, SAMPLERS, build_engine
from bilevel_maml.checkpoint import Checkpointer, atomic_save, load_checkpoint
from bilevel_maml.data.sources import DATASETS, load_tasksets
from bilevel_maml.engine import MetaEngine, NonFiniteError
from bilevel_maml.execution import PRECISIONS, check_precision
from bilevel_maml.logging import WandbLogger
from bilevel_maml.models import MODELS, build_model
from bilevel_maml.problems import ALGORITHMS
from bilevel_maml.progress import ProgressBar

DTYPES = {"float32": torch.float32, "float64": torch.float64}
RUN_FILES = ("config.json", "checkpoints/last.pt")


def _training_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--algorithm", choices=sorted(ALGORITHMS), default="maml")
    add("--dataset", choices=list(DATASETS), default="omniglot-small")
    add("--data-root", help="folder holding the dataset's files (default depends on --dataset)")
    add("--download", action="store_true", help="let learn2learn download missing benchmark files")
    add("--ways", type=int, default=5, help="classes per task")
    add("--shots", type=int, help="support examples per class (default: 1; 10 points for sinusoid)")
    add("--query-shots", type=int, help="query examples per class (default: --shots)")
    add("--inner-steps", type=int, default=1)
    add("--inner-lr", type=float, help="inner-loop SGD step size (default depends on --dataset)")
    add("--meta-lr", type=float, default=1e-3)
    add("--meta-batch-size", type=int, default=8, help="tasks per meta-update")
    add("--iterations", type=int, default=200, help="meta-iterations (outer updates)")
    add("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="outer optimizer")
    add("--model", choices=MODELS, help="backbone (default depends on --dataset)")
    add("--width", type=int, help="backbone width: conv4 filters, resnet12 first stage, mlp hidden units")
    add("--lam", type=float, default=1.0, help="iMAML proximal strength λ")
    add("--cg-iterations", type=int, default=5, help="iMAML conjugate-gradient iterations")
    add("--vectorize", action=argparse.BooleanOptionalAction, default=True,
        help="adapt the meta-batch at once with torch.func.vmap (default) or task by task")
    add("--sampler", choices=SAMPLERS, default="auto",
        help="device: each split held on --device and whole meta-batches drawn there; learn2learn: task by "
             "task on the CPU; auto (default): device where the split allows it and fits, else learn2learn")
    add("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
        help="on CUDA, capture the meta-iteration as a CUDA graph and replay it (default: wherever it works)")
    add("--precision", choices=PRECISIONS,
        help="fp32: no TF32; tf32: TF32 convolutions and matmuls (CUDA); bf16: autocast "
             "(default: tf32 on CUDA, fp32 elsewhere)")
    add("--seed", type=int, default=0)
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--dtype", choices=sorted(DTYPES), default="float32")
    add("--valid-every", type=int, default=50, help="validate every this many meta-iterations")
    add("--valid-tasks", type=int, default=100)
    add("--test-tasks", type=int, default=600, help="tasks in the final test report")
    add("--checkpoint-every", type=int, default=50, help="write checkpoints/last.pt every N meta-iterations")
    add("--output", help="run folder (default: runs/<algorithm>-<dataset>-<ways>w<shots>s-seed<seed>)")
    _distributed_options(parser)
    _logging_options(parser)


def _distributed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_SECONDS,
                        help="under torchrun: seconds a rank waits for the others before stopping with an error")


def _logging_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--wandb", choices=WandbLogger.MODES, default="offline", help="W&B mode (online uses your own key)")
    add("--wandb-project", default="bilevel-maml")
    add("--run-name", help="W&B run name (default: the run folder's name)")
    add("--group", help="W&B group")
    add("--tags", nargs="*", default=[], help="W&B tags")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar (default: only when stderr is a terminal)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel-maml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="meta-train, then report test accuracy")
    train.add_argument("--config", help="YAML or TOML file of options; command-line flags override it")
    _training_options(train)

    evaluate = commands.add_parser("evaluate", help="accuracy ± 95%% CI of a checkpoint on test tasks")
    evaluate.add_argument("--output", help="run folder (uses checkpoints/best.pt, else last.pt)")
    evaluate.add_argument("--checkpoint", help="checkpoint file (instead of --output)")
    evaluate.add_argument("--test-tasks", type=int, default=600)
    evaluate.add_argument("--device", default=None, help="default: the run's device")
    evaluate.add_argument("--result", help="JSON file to write (default: <run folder>/evaluation.json)")

    commands.add_parser("bench", help="meta-iteration, end-to-end and evaluation speed against learn2learn and JAX "
                                      "(benchmarks/meta_iteration.py of a source checkout; bench --help)",
                        add_help=False)

    resume = commands.add_parser("resume", help="continue an interrupted or finished run")
    resume.add_argument("--output", required=True, help="run folder holding checkpoints/last.pt")
    resume.add_argument("--iterations", type=int, help="new total of meta-iterations (default: the run's)")
    resume.add_argument("--device", default=None, help="default: the run's device")
    _distributed_options(resume)
    _logging_options(resume)
    return parser


def _config_file_arguments(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Turn a YAML/TOML file into command-line arguments placed before the real ones, so that
    argparse checks their values and explicit flags win."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"bilevel-maml: --config file {path!r} does not exist")
    if file.suffix == ".toml":
        values = tomllib.loads(file.read_text())
    elif file.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(file.read_text()) or {}
    else:
        raise SystemExit(f"bilevel-maml: --config must be a .yaml, .yml or .toml file, got {path!r}")
    known = {a.dest: a for a in parser._actions if a.option_strings}
    arguments: list[str] = []
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            allowed = ", ".join(sorted(k for k in known if k not in ("config", "help")))
            raise SystemExit(f"bilevel-maml: unknown option {key!r} in {path}; allowed: {allowed}")
        flag = known[dest].option_strings[0]
        if isinstance(value, bool):
            if isinstance(known[dest], argparse.BooleanOptionalAction):
                arguments.append(flag if value else flag.replace("--", "--no-", 1))
            elif value:
                arguments.append(flag)
        elif isinstance(value, list):
            arguments += [flag, *map(str, value)]
        elif value is not None:
            arguments += [flag, str(value)]
    return arguments


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv[:1] == ["bench"]:  # the benchmark has its own options
        return argparse.Namespace(command="bench", bench_args=argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train" and args.config:
        train_parser = parser._subparsers._group_actions[0].choices["train"]
        argv = ["train", *_config_file_arguments(args.config, train_parser), *argv[1:]]
        args = parser.parse_args(argv)
    return args


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"bilevel-maml: invalid --device {name!r} ({error}); use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bilevel-maml: --device {name} requested but CUDA is not available here; use --device cpu")
    return device


def _join_process_group(device: torch.device, timeout: float) -> torch.device:
    """Under torchrun, join the process group (gloo on CPU, NCCL on CUDA); else keep ``device``."""
    if not distributed.launched_distributed():
        return device
    try:
        return distributed.init_from_environment(device, timeout)
    except ValueError as error:
        raise SystemExit(f"bilevel-maml: {error}") from None


def _run_config(args: argparse.Namespace) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config["world_size"] = distributed.world()[1]
    spec = DATASETS[config["dataset"]]
    config["shots"] = config["shots"] or spec.shots
    config["query_shots"] = config["query_shots"] or config["shots"]
    config["inner_lr"] = config["inner_lr"] if config["inner_lr"] is not None else spec.inner_lr
    config["model"] = config["model"] or spec.model
    try:
        config["precision"] = check_precision(config["precision"], config["device"], DTYPES[config["dtype"]])
    except ValueError as error:
        raise SystemExit(f"bilevel-maml: --precision: {error}") from None
    if config["cuda_graph"] and torch.device(config["device"]).type != "cuda":
        raise SystemExit(f"bilevel-maml: --cuda-graph needs a CUDA device, got --device {config['device']}; "
                         f"drop the flag (CUDA runs use graphs wherever they work)")
    if config["output"] is None:
        c = config
        config["output"] = f"runs/{c['algorithm']}-{c['dataset']}-{c['ways']}w{c['shots']}s-seed{c['seed']}"
    return config


def build_from_config(config: dict, device: torch.device) -> MetaEngine:
    """The engine a run's configuration describes (same path for train, evaluate and resume)."""
    spec = DATASETS[config["dataset"]]
    tasksets = load_tasksets(config["dataset"], config["data_root"], config["ways"], config["shots"],
                             config["query_shots"], seed=config["seed"], download=config["download"])
    if spec.regression and config["model"] != "mlp":
        raise SystemExit(f"bilevel-maml: --dataset sinusoid needs --model mlp, got {config['model']!r}")
    torch.manual_seed(config["seed"])
    if spec.regression:
        model = build_model("mlp", 1, width=config["width"])
    elif config["model"] == "mlp":
        flat = spec.in_channels * spec.image_size**2
        model = torch.nn.Sequential(torch.nn.Flatten(), build_model("mlp", config["ways"], width=config["width"],
                                                                    in_features=flat))
    else:
        model = build_model(config["model"], config["ways"], in_channels=spec.in_channels,
                            image_size=spec.image_size, width=config["width"])
    return build_engine(
        config["algorithm"], model, tasksets, ways=config["ways"], shots=config["shots"],
        query_shots=config["query_shots"], inner_steps=config["inner_steps"], inner_lr=config["inner_lr"],
        meta_lr=config["meta_lr"], meta_batch_size=config["meta_batch_size"],
        meta_iterations=config["iterations"], optimizer=config["optimizer"], regression=spec.regression,
        lam=config["lam"], cg_iterations=config["cg_iterations"], valid_step=config["valid_every"],
        valid_tasks=config["valid_tasks"], seed=config["seed"], device=device,
        dtype=DTYPES[config["dtype"]], vectorize=config.get("vectorize", True),
        # runs written before these options existed drew their tasks through learn2learn, eagerly
        sampler=config.get("sampler", "learn2learn"),
        cuda_graph=config.get("cuda_graph", False) if device.type == "cuda" else False,
        precision=config.get("precision") if device.type == torch.device(config["device"]).type else None,
    )


def _task_kind(config: dict) -> str:
    if DATASETS[config["dataset"]].regression:
        return f"{config['shots']}-shot regression"
    return f"{config['ways']}-way {config['shots']}-shot"


def _format(stats: dict) -> str:
    if "accuracy" in stats:
        return f"{100 * stats['accuracy']:.2f}% ± {100 * stats['accuracy_ci95']:.2f}%"
    return f"MSE {stats['loss']:.4f} ± {stats['loss_ci95']:.4f}"


def _train(engine: MetaEngine, config: dict, output: Path, args: argparse.Namespace) -> dict:
    """Run (or continue) meta-training with progress, checkpoints and W&B, then test. Under
    torch.distributed every rank trains and takes part in checkpoints; rank 0 alone shows progress,
    logs to W&B, writes files and runs the final test."""
    main = engine.rank == 0
    checkpointer = Checkpointer(output / "checkpoints", every=config["checkpoint_every"], config=config)
    engine.callbacks += [ProgressBar(args.progress), checkpointer] if main else [checkpointer]
    logger = None
    run_name = args.run_name or output.name
    if args.wandb != "disabled" and main:
        logger = WandbLogger(project=args.wandb_project, name=run_name, group=args.group,
                             tags=args.tags, config=config, mode=args.wandb, dir=str(output))
        engine.logger = logger
    if main:
        ranks = f" on {engine.world_size} processes" if engine.world_size > 1 else ""
        print(f"{config['algorithm']} on {config['dataset']}: {_task_kind(config)}, "
              f"{config['iterations']} meta-iterations of {config['meta_batch_size']} tasks{ranks} "
              f"(from iteration {engine.meta_iteration}), run folder {output}", flush=True)
    try:
        engine.run()
    except distributed.RankFailure:
        if logger is not None:
            logger.finish()
        raise
    except NonFiniteError as error:
        kept = checkpointer.last or checkpointer.best
        message = f"bilevel-maml: stopped: {error}. "
        message += f"Last good checkpoint: {kept}" if kept else "No checkpoint had been written yet."
        if logger is not None:
            logger.finish()
        raise SystemExit(message) from None
    if not main:
        return {"rank": engine.rank, "iteration": engine.meta_iteration}
    if checkpointer.best is not None and engine.best_valid is not None:
        engine.load_parameters(load_checkpoint(checkpointer.best)["engine"])
        entry, trained_at = "best", engine.best_valid["iteration"]
    else:
        entry, trained_at = "last", engine.meta_iteration
    result = engine.test(config["test_tasks"])
    result.update(checkpoint=entry, iteration=trained_at, config=config)
    atomic_save_json(output / "result.json", result)
    print(f"held-out test, {_task_kind(config)} ({entry} θ, iteration {trained_at}): {_format(result)} "
          f"(95% CI over {result['tasks']} tasks)", flush=True)
    if logger is not None:
        if checkpointer.best is not None:
            logger.log_artifact(checkpointer.best, name=f"{run_name}-best", metadata=engine.best_valid)
        run_dir = logger.run_dir
        logger.finish()
        if run_dir:
            print(f"W&B {args.wandb} run: {run_dir}", flush=True)
    return result


def atomic_save_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    partial.replace(path)


def command_train(args: argparse.Namespace) -> dict:
    device = _join_process_group(_device(args.device), args.dist_timeout)
    config = _run_config(args)
    output = Path(config["output"])
    existing = [f for f in RUN_FILES if (output / f).exists()]
    if (output / "checkpoints" / "last.pt").exists():
        raise SystemExit(f"bilevel-maml: {output} already holds a run ({', '.join(existing)}); continue it "
                         f"with `bilevel-maml resume --output {output}` or choose another --output")
    engine = build_from_config(config, device)
    distributed.barrier("checking the run folder on every rank")  # before rank 0 creates it
    if engine.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        atomic_save_json(output / "config.json", config)
    return _train(engine, config, output, args)


def command_resume(args: argparse.Namespace) -> dict:
    output = Path(args.output)
    checkpoint = load_checkpoint(output / "checkpoints" / "last.pt")
    config = dict(checkpoint["config"])
    if args.iterations is not None:
        config["iterations"] = args.iterations
    device = _join_process_group(_device(args.device or config["device"]), args.dist_timeout)
    config["world_size"] = distributed.world()[1]
    engine = build_from_config(config, device)
    engine.load_state_dict(checkpoint["engine"])
    if engine.meta_iteration >= config["iterations"]:
        print(f"run already at iteration {engine.meta_iteration} of {config['iterations']}; "
              f"pass --iterations to train further")
    return _train(engine, config, output, args)


def command_evaluate(args: argparse.Namespace) -> dict:
    if args.checkpoint:
        path = Path(args.checkpoint)
    elif args.output:
        folder = Path(args.output) / "checkpoints"
        path = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    else:
        raise SystemExit("bilevel-maml evaluate: pass --output RUN_FOLDER or --checkpoint FILE")
    if distributed.launched_distributed():
        raise SystemExit("bilevel-maml evaluate runs in one process; start it without torchrun")
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    engine = build_from_config(config, _device(args.device or config["device"]))
    engine.load_parameters(checkpoint["engine"])
    engine.meta_iteration = checkpoint["engine"]["meta_iteration"]
    result = engine.test(args.test_tasks)
    result.update(checkpoint=str(path), iteration=engine.meta_iteration, config=config)
    target = Path(args.result) if args.result else path.parent.parent / "evaluation.json"
    atomic_save_json(target, result)
    print(f"{config['algorithm']} {config['dataset']} {_task_kind(config)}, "
          f"θ from {path} (iteration {engine.meta_iteration}): {_format(result)} "
          f"(95% CI over {result['tasks']} test tasks); written to {target}")
    return result


def _bench(argv: list[str]) -> dict:
    """``bilevel-maml bench``: the source checkout's ``benchmarks/meta_iteration.py`` (the comparison
    harness is not part of the installed package)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_iteration.py"
    if not script.is_file():
        raise SystemExit("bilevel-maml bench runs benchmarks/meta_iteration.py of a source checkout of bilevel_maml "
                         "(the comparison harness is not installed with the package); clone the repository and "
                         "install it with `pip install -e .`")
    sys.path.insert(0, str(script.parent))
    import meta_iteration

    return meta_iteration.main(argv, prog="bilevel-maml bench")


def run(argv: list[str] | None = None) -> dict:
    """Run one command; returns its result (raises ``SystemExit`` with a message on bad input)."""
    args = parse(argv)
    if args.command == "bench":
        return _bench(args.bench_args)
    command = {"train": command_train, "evaluate": command_evaluate, "resume": command_resume}[args.command]
    try:
        return command(args)
    except (ValueError, TypeError, FileNotFoundError, distributed.RankFailure) as error:
        raise SystemExit(f"bilevel-maml {args.command}: {error}") from None
    finally:
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # this process is ours: reuse freed activations instead of page-faulting them in
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
