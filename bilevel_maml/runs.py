"""What ``bilevel-maml train``, ``resume``, ``evaluate`` and ``plot`` do with a run folder: the
engine its config describes, meta-training with checkpoints, W&B and a graceful stop, the test
report, and the refusals that keep a run folder to one run."""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
from pathlib import Path

import torch

from bilevel_maml import distributed
from bilevel_maml._factories import outside_package, takes_keyword
from bilevel_maml.arguments import (DTYPES, RUN_LOGGING_DEFAULTS, BadInput, device_name, load_plugins,
                                    unknown_dataset, unknown_model)
from bilevel_maml.builder import SPLITS, build_engine, split_sources
from bilevel_maml.checkpoint import CHECKPOINT_FILES, CheckpointError, Checkpointer, load_checkpoint, newest_intact
from bilevel_maml.data.sources import DATASETS, default_data_root, inner_loop_defaults, load_tasksets
from bilevel_maml.engine import MetaEngine, NonFiniteError
from bilevel_maml.evaluation import scalar_scores
from bilevel_maml.execution import check_precision
from bilevel_maml.history import METRICS_FILE, RUN_PLACEMENT_KEYS, MetricsFile, plain_json
from bilevel_maml.logging import WandbLogger
from bilevel_maml.models import MODELS, REGISTERED_MODELS, build_model, known_models
from bilevel_maml.plugins import defining_modules, import_folder, unknown_algorithm
from bilevel_maml.problems import ALGORITHMS, imaml_settings_of, options_in_use
from bilevel_maml.progress import ProgressBar
from bilevel_maml.runlock import RunFolderInUse, RunLock
from bilevel_maml.stopping import GracefulStop, StoppedAtOnce, exit_status

RUN_FILES = ("config.json", "checkpoints/last.pt")

def _device(name: str) -> torch.device:
    """``--device`` of a command or a run's config (which the parser's type did not see)."""
    try:
        return torch.device(device_name(name))
    except argparse.ArgumentTypeError as error:
        raise BadInput(f"bilevel-maml: invalid --device: {error}") from None


def _join_process_group(device: torch.device, timeout: float) -> torch.device:
    """Under torchrun, join the process group (gloo on CPU, NCCL on CUDA); else keep ``device``."""
    if not distributed.launched_distributed():
        return device
    try:
        return distributed.init_from_environment(device, timeout)
    except ValueError as error:
        raise BadInput(f"bilevel-maml: {error}") from None


def _run_config(args: argparse.Namespace) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config["world_size"] = distributed.world()[1]
    spec = DATASETS[config["dataset"]]
    config["model"] = config["model"] or spec.model
    defining = {f"algorithm {config['algorithm']!r}": defining_modules(config["algorithm"]),
                f"model {config['model']!r}": outside_package(REGISTERED_MODELS.get(config["model"])),
                f"dataset {config['dataset']!r}": outside_package(spec.load)}
    config["plugins"] = list(dict.fromkeys([*config["plugins"], *(m for modules in defining.values() for m in modules)]))
    if "__main__" in config["plugins"]:
        config["plugins"].remove("__main__")
        in_script = [what for what, modules in defining.items() if "__main__" in modules]
        several = len(in_script) > 1
        print(f"bilevel-maml: warning: {', '.join(in_script[:-1]) + ' and ' if several else ''}{in_script[-1]} "
              f"{'are' if several else 'is'} defined in the running script (__main__), which `bilevel-maml evaluate` "
              f"and `resume` cannot import; define {'them' if several else 'it'} in a module and pass --plugin MODULE",
              file=sys.stderr, flush=True)
    # where each was found, so that evaluate and resume find a plugin file from any folder
    config["plugin_folders"] = {m: folder for m in config["plugins"] if (folder := import_folder(m)) is not None}
    try:  # every option of the algorithm, with the value this run uses (None: the class's own default rule)
        config["algorithm_options"] = options_in_use(config["algorithm"], dict(config["algorithm_options"]))
    except ValueError as error:
        raise BadInput(f"bilevel-maml: --option: {error}") from None
    own_cosine = config["algorithm_options"].get("cosine_lr")  # MAML++'s, on by default
    if config["meta_lr_schedule"] == "cosine" and own_cosine is False:
        raise BadInput("bilevel-maml: --meta-lr-schedule cosine and --option cosine_lr=false disagree; drop one")
    if config["min_meta_lr"] is not None and config["meta_lr_schedule"] != "cosine" and own_cosine is not True:
        raise BadInput(f"bilevel-maml: --min-meta-lr {config['min_meta_lr']} is where a cosine schedule ends, and this "
                       f"run's rate is constant; add --meta-lr-schedule cosine")
    _refuse_flags_the_run_would_ignore(config)
    config["ways"] = config["ways"] or 5  # regression runs keep the default in their config, as before
    config["cg_iterations"] = config["cg_iterations"] or 5
    config["shots"] = config["shots"] or spec.shots
    config["query_shots"] = config["query_shots"] or config["shots"]
    for name, value in inner_loop_defaults(config["dataset"], config["algorithm"]).items():
        config[name] = config[name] if config[name] is not None else value
    config["eval_inner_steps"] = config["eval_inner_steps"] or config["inner_steps"]
    try:
        config["precision"] = check_precision(config["precision"], config["device"], DTYPES[config["dtype"]])
    except ValueError as error:
        raise BadInput(f"bilevel-maml: --precision: {error}") from None
    if config["cuda_graph"] and torch.device(config["device"]).type != "cuda":
        raise BadInput(f"bilevel-maml: --cuda-graph needs a CUDA device, got --device {config['device']}; "
                       f"drop the flag (CUDA runs use graphs wherever they work)")
    if config["output"] is None:
        c = config
        config["output"] = f"runs/{c['algorithm']}-{c['dataset']}-{c['ways']}w{c['shots']}s-seed{c['seed']}"
        if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):  # a W&B sweep agent's run
            config["output"] += f"-{os.environ['WANDB_RUN_ID']}"  # each of the sweep's runs a folder of its own
    _check_writable_folder("--output", Path(config["output"]))
    if config["data_root"] is not None and Path(config["data_root"]).exists() and not Path(config["data_root"]).is_dir():
        raise BadInput(f"bilevel-maml: --data-root {config['data_root']!r} is a file; pass the folder holding "
                       f"the dataset's files")
    config["data_root"] = _data_folder(config)
    return config


def _refuse_flags_the_run_would_ignore(config: dict) -> None:
    """A flag the run would record and not use: iMAML's with an algorithm without its classes,
    ``--ways`` with regression tasks, ``--download`` where nothing downloads."""
    if DATASETS[config["dataset"]].regression and config["ways"] is not None:
        raise BadInput(f"bilevel-maml: --ways {config['ways']}: {config['dataset']} tasks are regression, which "
                       f"has no classes; drop --ways (--shots sets the points per task)")
    if config["download"]:
        _refuse_download_that_does_nothing(config["dataset"], "bilevel-maml")
    taken = imaml_settings_of(*ALGORITHMS[config["algorithm"]])
    meanings = {"lam": "iMAML's proximal strength λ", "cg_iterations": "iMAML's conjugate-gradient iterations"}
    ignored = [f"--{name.replace('_', '-')} {config[name]} ({meaning})"
               for name, meaning in meanings.items() if config[name] is not None and name not in taken]
    if ignored:
        them = "them" if len(ignored) > 1 else "it"
        raise BadInput(f"bilevel-maml: {' and '.join(ignored)}: {config['algorithm']} does not use {them}; "
                       f"drop {them} or choose --algorithm imaml")


def _refuse_download_that_does_nothing(dataset: str, command: str) -> None:
    spec = DATASETS[dataset]
    if spec.load is not None:
        if takes_keyword(spec.load, "download"):
            return
        why = f"the loader registered for it ({spec.load.__module__}.{spec.load.__qualname__}) takes no download"
    elif dataset == "sinusoid":
        why = "its tasks are drawn, not read from files"
    elif dataset == "omniglot-small":
        why = ("it is read from the two zip files of github.com/brendenlake/omniglot (folder python/) in --data-root; "
               "--dataset omniglot is the full set, which learn2learn downloads")
    else:
        return
    raise BadInput(f"{command}: --download with --dataset {dataset}: {why}; drop --download")


def _data_folder(config: dict) -> str | None:
    """The run's data folder as an absolute path (the dataset's default where none was given), so that
    ``evaluate`` and ``resume`` find it from any folder. A registered loader's root is kept as given
    unless it is a path that exists: the loader may read it as something else."""
    spec = DATASETS.get(config["dataset"])  # None: a stored run's dataset whose plugin this command lacks
    root = config["data_root"]
    if root is None and spec is not None:
        root = default_data_root(config["dataset"])
    if root is None:
        return None
    folder = Path(root).expanduser()
    return str(folder.resolve()) if folder.exists() or (spec is not None and spec.load is None) else root


def _check_writable_folder(flag: str, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"bilevel-maml: {flag} {str(folder)!r} is a file; pass a folder (it is created if missing)")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"bilevel-maml: {flag} {str(folder)!r} cannot be written here ({existing} is not a "
                       f"writable folder)")


def _registered_model(config: dict, spec, outputs: int) -> torch.nn.Module:
    """A network of the user's own (register_model), given what the dataset's tasks look like."""
    channels, size = (None, None) if spec.vector_inputs else (spec.in_channels, spec.image_size)
    try:
        return build_model(config["model"], outputs, in_channels=channels, image_size=size, width=config["width"],
                           in_features=spec.in_features)
    except Exception as error:  # the factory is the user's code: its failure is one line naming it
        raise BadInput(f"bilevel-maml: --model {config['model']}: {type(error).__name__}: "
                       f"{' '.join(str(error).split())}") from None


def _runs_dataset(config: dict):
    """The spec of the run's dataset (its plugins loaded), or one line saying it is unknown."""
    if config["dataset"] not in DATASETS:
        raise BadInput(f"bilevel-maml: the run's {unknown_dataset(config['dataset'])}")
    return DATASETS[config["dataset"]]


def _load_runs_plugins(config: dict) -> None:
    """The run's plugins, looked for also where the run imported them from (any folder works)."""
    load_plugins(config.get("plugins", []), whose="the run's --plugin", found_in=config.get("plugin_folders"))


def build_from_config(config: dict, device: torch.device, only_split: str | None = None) -> MetaEngine:
    """The engine a run's configuration describes (same path for train, evaluate and resume).

    :param only_split: draw every split's tasks from this one (``evaluate`` on other tasks than the
        run's scores one split, and must not be refused for what the others lack).
    """
    _load_runs_plugins(config)
    if config["algorithm"] not in ALGORITHMS:
        raise BadInput(f"bilevel-maml: the run's {unknown_algorithm(config['algorithm'])}")
    spec = _runs_dataset(config)
    if config["model"] not in known_models():
        raise BadInput(f"bilevel-maml: the run's {unknown_model(config['model'])}")
    if spec.vector_inputs and config["model"] in MODELS and config["model"] != "mlp":
        raise BadInput(f"bilevel-maml: --dataset {config['dataset']} has vector inputs: it needs --model mlp (or a "
                       f"network of your own), got {config['model']!r}")
    try:
        tasksets = load_tasksets(config["dataset"], config["data_root"], config["ways"], config["shots"],
                                 config["query_shots"], seed=config["seed"], download=config["download"])
    except Exception as error:
        if spec.load is None:
            raise  # the built-in loaders' own errors are one line already (missing files, say)
        raise BadInput(f"bilevel-maml: --dataset {config['dataset']}: {type(error).__name__}: "
                       f"{' '.join(str(error).split())}") from None
    if only_split is not None:
        scored = split_sources(tasksets)[only_split]
        tasksets = {only_split: scored, **{split: scored for split in SPLITS if split != only_split}}
    torch.manual_seed(config["seed"])
    outputs = 1 if spec.regression else config["ways"]
    if config["model"] in REGISTERED_MODELS:
        model = _registered_model(config, spec, outputs)
    elif spec.vector_inputs:
        model = build_model("mlp", outputs, width=config["width"], in_features=spec.in_features)
    elif config["model"] == "mlp":
        model = torch.nn.Sequential(torch.nn.Flatten(), build_model("mlp", outputs, width=config["width"],
                                                                    in_features=spec.in_features))
    else:
        model = build_model(config["model"], outputs, in_channels=spec.in_channels, image_size=spec.image_size,
                            width=config["width"])
    return build_engine(
        config["algorithm"], model, tasksets, ways=config["ways"], shots=config["shots"],
        query_shots=config["query_shots"], inner_steps=config["inner_steps"], inner_lr=config["inner_lr"],
        meta_lr=config["meta_lr"], meta_batch_size=config["meta_batch_size"],
        meta_iterations=config["iterations"], optimizer=config["optimizer"],
        gradient_clipping=config.get("gradient_clipping", 0.0),
        # constant: the algorithm's own (MAML++ anneals its own cosine unless cosine_lr=false)
        meta_lr_schedule=None if config.get("meta_lr_schedule", "constant") == "constant" else config["meta_lr_schedule"],
        min_meta_lr=config.get("min_meta_lr"), regression=spec.regression,
        lam=config["lam"], cg_iterations=config["cg_iterations"], valid_step=config["valid_every"],
        valid_tasks=config["valid_tasks"], eval_inner_steps=config.get("eval_inner_steps"), seed=config["seed"],
        device=device,
        dtype=DTYPES[config["dtype"]], vectorize=config.get("vectorize", True),
        # runs written before these options existed drew their tasks through learn2learn, eagerly
        sampler=config.get("sampler", "learn2learn"),
        cuda_graph=config.get("cuda_graph", False) if device.type == "cuda" else False,
        precision=config.get("precision") if device.type == torch.device(config["device"]).type else None,
        algorithm_options=config.get("algorithm_options"),
    )


def _task_kind(config: dict) -> str:
    if DATASETS[config["dataset"]].regression:
        return f"{config['shots']}-shot regression"
    return f"{config['ways']}-way {config['shots']}-shot"


def _inner_steps(count: int) -> str:
    return f"{count} inner step{'s' if count != 1 else ''}"


def _evaluation_steps(engine: MetaEngine) -> str:
    """How many inner steps held-out tasks took, where that differs from training."""
    steps = engine.eval_inner_steps
    return "" if steps == engine.inner_steps else f", adapted with {_inner_steps(steps)}"


def _print_per_step(result: dict) -> None:
    """An evaluation's ``per_step`` lists, if it has them, as a line per number of steps taken."""
    curve = result.get("per_step", {})
    for steps, values in enumerate(zip(*curve.values())):
        print(f"  after {_inner_steps(steps)}: {_format(dict(zip(curve, values)))}", flush=True)


def _format(stats: dict) -> str:
    if "accuracy" in stats:
        mean, half, unit, digits = 100 * stats["accuracy"], 100 * stats["accuracy_ci95"], "%", 2
    else:
        mean, half, unit, digits = stats["loss"], stats["loss_ci95"], "", 4
    spread = f" ± {half:.{digits}f}{unit}" if math.isfinite(half) else " ± n/a"
    return f"{'' if unit else 'MSE '}{mean:.{digits}f}{unit}{spread}"


def _train(engine: MetaEngine, config: dict, output: Path, args: argparse.Namespace) -> dict:
    """Run (or continue) meta-training with progress, checkpoints and W&B, then test. Under
    torch.distributed every rank trains and takes part in checkpoints; rank 0 alone shows progress,
    logs to W&B, writes files and runs the final test."""
    main = engine.rank == 0
    checkpointer = Checkpointer(output / "checkpoints", every=config["checkpoint_every"], config=config)
    engine.callbacks += [ProgressBar(args.progress), MetricsFile(output / METRICS_FILE), checkpointer] if main \
        else [checkpointer]
    logger = None
    run_name = args.run_name or output.name
    if args.wandb != "disabled" and main:
        logger = _runs_wandb(config, args.wandb, output, run_name)
        engine.logger = logger
        if logger.run is not None and logger.run.id != config.get("wandb_id"):
            # a W&B sweep agent's run keeps the agent's id (wandb ignores ours): resume and evaluate continue it
            config["wandb_id"] = logger.run.id  # the checkpoints' config is this dict
            logger.run.config.update({"wandb_id": logger.run.id}, allow_val_change=True)
            atomic_save_json(output / "config.json", config)
    if main:
        ranks = f" on {engine.world_size} processes" if engine.world_size > 1 else ""
        print(f"{config['algorithm']} on {config['dataset']}: {_task_kind(config)}, "
              f"{config['iterations']} meta-iteration{'s' if config['iterations'] != 1 else ''} of "
              f"{config['meta_batch_size']} task{'s' if config['meta_batch_size'] != 1 else ''}{ranks} "
              f"(from iteration {engine.meta_iteration}), run folder {output}", flush=True)
    try:
        with GracefulStop(engine):
            engine.run()
    except StoppedAtOnce as stop:
        kept = checkpointer.last or checkpointer.best
        if main:
            print(f"bilevel-maml: {stop}; " + (f"the last checkpoint written is {kept}: continue with "
                  f"`{_resume_command(engine, output)}`" if kept else "no checkpoint had been written yet"),
                  file=sys.stderr, flush=True)
        raise SystemExit(exit_status(stop.signum)) from None
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
    if engine.stop_signal is not None:
        if logger is not None:
            logger.finish()
        if main:
            print(f"bilevel-maml: stopped by {signal.Signals(engine.stop_signal).name} after meta-iteration "
                  f"{engine.meta_iteration} of {config['iterations']}; checkpoint written to {checkpointer.last}; "
                  f"continue with `{_resume_command(engine, output)}`", file=sys.stderr, flush=True)
        raise SystemExit(exit_status(engine.stop_signal))
    if not main:
        return {"rank": engine.rank, "iteration": engine.meta_iteration}
    if checkpointer.best is not None and engine.best_valid is not None:
        engine.load_parameters(load_checkpoint(checkpointer.best)["engine"])
        entry, trained_at = "best", engine.best_valid["iteration"]
    else:
        entry, trained_at = "last", engine.meta_iteration
    result = engine.test(config["test_tasks"], per_step=config.get("per_step", False))
    result.update(checkpoint=entry, iteration=trained_at, config=config)
    atomic_save_json(output / "result.json", result)
    print(f"held-out test, {_task_kind(config)} ({entry} θ, iteration {trained_at}): {_format(result)} "
          f"(95% CI over {result['tasks']} tasks{_evaluation_steps(engine)})", flush=True)
    _print_per_step(result)
    if logger is not None:
        if checkpointer.best is not None:
            logger.log_artifact(checkpointer.best, name=f"{run_name}-best", metadata=engine.best_valid)
        _finish_and_name(logger, args.wandb)
    return result


def _resume_command(engine: MetaEngine, output: Path) -> str:
    if engine.world_size > 1:
        return f"torchrun --nproc_per_node {engine.world_size} -m bilevel_maml resume --output {output}"
    return f"bilevel-maml resume --output {output}"


def atomic_save_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(plain_json(data), indent=2, default=str, allow_nan=False))
    partial.replace(path)


def _holds_run(output: Path) -> bool:
    return any((output / "checkpoints" / name).exists() for name in CHECKPOINT_FILES)


def _refuse_existing_run(output: Path) -> None:
    if _holds_run(output):
        existing = [f for f in RUN_FILES if (output / f).exists()] or ["checkpoints"]
        raise BadInput(f"bilevel-maml: {output} already holds a run ({', '.join(existing)}); continue it "
                       f"with `bilevel-maml resume --output {output}` or choose another --output")


def _lock(output: Path, engine: MetaEngine) -> RunLock | None:
    """Rank 0 locks the run folder; every rank learns whether it could."""
    lock, refusal = None, None
    if engine.rank == 0:
        try:
            lock = RunLock(output).acquire()
        except (RunFolderInUse, OSError) as error:
            refusal = str(error)
    refusal = distributed.broadcast_object(refusal, what="learning whether rank 0 could lock the run folder")
    if refusal is not None:
        raise BadInput(f"bilevel-maml: {refusal}")
    return lock


#: what ``train --resume-if-exists`` lets differ from the run it continues (``iterations`` may grow)
NOT_THE_RUNS_SETTINGS = RUN_PLACEMENT_KEYS | {"iterations"}


def command_train(args: argparse.Namespace) -> dict:
    device = _join_process_group(_device(args.device), args.dist_timeout)
    config = _run_config(args)
    output = Path(config["output"])
    if args.resume_if_exists and _holds_run(output):
        return _resume_the_same_run(args, config, output)
    _refuse_existing_run(output)
    engine = build_from_config(config, device)
    lock = _lock(output, engine)
    try:
        _refuse_existing_run(output)  # again, now that no other process can start one here
        config["wandb_id"] = secrets.token_hex(4)
        config["wandb_id"] = distributed.broadcast_object(config["wandb_id"], what="receiving the W&B run id")
        if engine.rank == 0:
            atomic_save_json(output / "config.json", config)
        return _train(engine, config, output, args)
    finally:
        if lock is not None:
            lock.release()


def _resume_the_same_run(args: argparse.Namespace, config: dict, output: Path) -> dict:
    """``train --resume-if-exists`` on a folder holding a run: ``resume`` it, if the command asks for
    that run; else one line naming each setting that differs."""
    found = newest_intact(output / "checkpoints")
    resumed = found[1]["config"]  # its total as resume last set it
    # the settings as train wrote them (a checkpoint's config holds what resume resolved, sampler="auto" say)
    stored = json.loads((output / "config.json").read_text()) if (output / "config.json").is_file() else resumed
    stored = {**stored, "data_root": _data_folder(stored)}  # a run of before data folders were recorded whole
    differ = [f"{name} (the run's {stored[name]!r}, this command's {config[name]!r})" for name in config
              if name not in NOT_THE_RUNS_SETTINGS and name in stored and stored[name] != config[name]]
    if config["iterations"] < resumed["iterations"]:
        differ.append(f"iterations (the run's {resumed['iterations']}, this command's {config['iterations']}: "
                      f"fewer)")
    if differ:
        raise BadInput(f"bilevel-maml: --resume-if-exists: {output} holds another run: {'; '.join(differ)}; "
                       f"choose another --output")
    finished = _finished(output, found[1], config["iterations"])
    if distributed.is_main_process():
        print(f"bilevel-maml: {output} holds this run; " + (f"it {finished}; nothing to do" if finished else
                                                            "continuing it (--resume-if-exists)"), flush=True)
    if finished:
        return json.loads((output / "result.json").read_text())
    resume = argparse.Namespace(output=str(output), iterations=config["iterations"], device=args.device,
                                plugins=[], dist_timeout=args.dist_timeout, progress=args.progress,
                                **{name: getattr(args, name) for name in RUN_LOGGING_DEFAULTS})
    return command_resume(resume, found)


def _finished(output: Path, checkpoint: dict, iterations: int) -> str | None:
    """"is finished (...)" where the checkpoint reached ``iterations`` and the run was tested: nothing
    is left to do; else None."""
    reached, result = checkpoint["engine"]["meta_iteration"], output / "result.json"
    if reached >= iterations and result.is_file():
        of = f" of {iterations}" if reached == iterations else f", more than the {iterations} asked for"
        return f"is finished (iteration {reached}{of}; test result in {result})"
    return None


def command_resume(args: argparse.Namespace, found: tuple | None = None) -> dict:
    """``bilevel-maml resume``; ``found``: what :func:`newest_intact` returned for the run, when
    the caller has read it already."""
    output = Path(args.output)
    if not output.is_dir():
        raise BadInput(f"bilevel-maml resume: --output {str(output)!r} is not a run folder")
    path, checkpoint, problems = found or newest_intact(output / "checkpoints")
    if problems or path.name != "last.pt":
        print(f"bilevel-maml resume: warning: {'; '.join(problems) + '; ' if problems else ''}continuing from "
              f"{path} (iteration {checkpoint['engine']['meta_iteration']}), the newest intact checkpoint",
              file=sys.stderr, flush=True)
    config = dict(checkpoint["config"])
    config.setdefault("wandb_id", secrets.token_hex(4))
    if config.get("sampler") == "auto":
        # The saved stream decides: "auto" may choose otherwise today (sinusoids were drawn on the host
        # before 2026-12-06; another device may not hold a split) and the run must go on drawing as it did.
        drawn_on_device = "generator" in checkpoint["engine"]["envs"]["train"]
        config["sampler"] = "device" if drawn_on_device else "learn2learn"
    if args.iterations is not None:  # checked by the parser
        config["iterations"] = args.iterations
    for name, default in RUN_LOGGING_DEFAULTS.items():  # the same W&B run, unless a flag says otherwise
        if getattr(args, name) is None:
            setattr(args, name, config.get(name, default))
        config[name] = getattr(args, name)
    device = _device(args.device or config["device"])
    finished = _finished(output, checkpoint, config["iterations"])
    if finished:
        print(f"bilevel-maml resume: {output} {finished}; pass --iterations N with N > "
              f"{checkpoint['engine']['meta_iteration']} to train further", flush=True)
        return json.loads((output / "result.json").read_text())
    device = _join_process_group(device, args.dist_timeout)
    config["world_size"] = distributed.world()[1]
    engine = build_from_config(config, device)
    lock = _lock(output, engine)
    try:
        engine.load_state_dict(checkpoint["engine"])
        return _train(engine, config, output, args)
    finally:
        if lock is not None:
            lock.release()


def command_evaluate(args: argparse.Namespace) -> dict:
    if args.checkpoint:
        path = Path(args.checkpoint)
    elif args.output:
        folder = Path(args.output) / "checkpoints"
        path = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    else:
        raise BadInput("bilevel-maml evaluate: pass --output RUN_FOLDER or --checkpoint FILE")
    if distributed.launched_distributed():
        raise BadInput("bilevel-maml evaluate runs in one process; start it without torchrun")
    checkpoint = _load_checkpoint_to_evaluate(path, chosen=bool(args.checkpoint))
    run = checkpoint["config"]
    config = _evaluation_tasks(args, run)
    own_tasks = all(config[key] == run[key] for key in EVALUATION_TASKS)
    # the run's own tasks are built as training built them (the same draws, so the same scores)
    engine = build_from_config(config, _device(args.device or config["device"]),
                               only_split=None if own_tasks else args.split)
    engine.callbacks.append(ProgressBar(args.progress))
    engine.load_parameters(checkpoint["engine"])
    engine.meta_iteration = checkpoint["engine"]["meta_iteration"]
    if args.eval_inner_steps is not None:
        engine.eval_inner_steps = args.eval_inner_steps
    if args.split == "test":
        result = engine.test(args.test_tasks, per_step=args.per_step)
    else:
        result = engine.evaluate(engine.valid_env, args.test_tasks, per_step=args.per_step)
    tasks = {key: config[key] for key in EVALUATION_TASKS}
    result.update(checkpoint=str(path), iteration=engine.meta_iteration, eval_inner_steps=engine.eval_inner_steps,
                  split=args.split, **tasks, config=run)
    name = "-".join(["evaluation", *(["validation"] if args.split == "validation" else []),
                     *([] if own_tasks else [config["dataset"], _setting(config)])])
    target = Path(args.result) if args.result else path.parent.parent / f"{name}.json"
    atomic_save_json(target, result)
    trained_on = "" if own_tasks else f" (trained on {run['dataset']} {_task_kind(run)})"
    print(f"{config['algorithm']} {config['dataset']} {_task_kind(config)}{trained_on}, "
          f"θ from {path} (iteration {engine.meta_iteration}): {_format(result)} "
          f"(95% CI over {result['tasks']} {args.split} tasks{_evaluation_steps(engine)}); written to {target}")
    _print_per_step(result)
    wandb_mode = args.wandb or run.get("wandb", "disabled")
    if wandb_mode != "disabled":
        _summarize_in_the_runs_wandb(result, name, run, wandb_mode, path.parent.parent)
    return result


def _load_checkpoint_to_evaluate(path: Path, chosen: bool) -> dict:
    """A damaged ``best.pt`` is an error, not a silent switch to ``last.pt``: the two are different θs,
    and a score must say which it is; the error names the flag that scores the other."""
    try:
        return load_checkpoint(path)
    except CheckpointError as error:
        last = path.parent / "last.pt"
        if chosen or path.name != "best.pt" or not last.is_file():
            raise
        raise CheckpointError(f"{error}; to score the last θ instead: --checkpoint {last}") from None


def _summarize_in_the_runs_wandb(result: dict, tag: str, run: dict, mode: str, folder: Path) -> None:
    """Put an evaluation's scores in the summary of the W&B run that training logged to (the same
    id, project and folder), as ``<tag>/accuracy`` and so on: W&B's way to add a score after a run."""
    scores = {key: value for key, value in result.items() if key != "config"}
    logger = _runs_wandb(run, mode, folder, run.get("run_name") or Path(run["output"]).name)
    logger.summarize(scalar_scores(scores, tag))
    _finish_and_name(logger, mode, f" (summary: {tag}/...)")


def _runs_wandb(config: dict, mode: str, folder: Path, name: str) -> WandbLogger:
    """The run's W&B run, started or continued, under ``folder``: its id, project, group and tags from
    its config (train and resume put their W&B flags there), so every command reaches the same run."""
    return WandbLogger(project=config.get("wandb_project", RUN_LOGGING_DEFAULTS["wandb_project"]), name=name,
                       group=config.get("group"), tags=config.get("tags"), config=config, mode=mode, dir=str(folder),
                       id=config.get("wandb_id"))


def _finish_and_name(logger: WandbLogger, mode: str, what: str = "") -> None:
    """Close the W&B run and say where its folder is."""
    run_dir = logger.run_dir
    logger.finish()
    if run_dir:
        print(f"W&B {mode} run: {run_dir}{what}", flush=True)


#: what a task of ``evaluate`` is made of, the run's unless its flags say otherwise
EVALUATION_TASKS = ("dataset", "ways", "shots", "query_shots")


def _evaluation_tasks(args: argparse.Namespace, run: dict) -> dict:
    """The run's config with the test tasks ``evaluate`` was asked for; another dataset is refused
    in one line, before any data is read, where the run's network cannot take its inputs."""
    config = dict(run)
    if args.dataset is not None and args.dataset != run["dataset"]:
        # the dataset asked for may be registered by one of them
        _load_runs_plugins(run)
        trained = _runs_dataset(run)
        if args.dataset not in DATASETS:
            raise BadInput(f"bilevel-maml evaluate: --dataset: {unknown_dataset(args.dataset)}")
        asked = DATASETS[args.dataset]
        if _inputs(asked) != _inputs(trained):
            raise BadInput(f"bilevel-maml evaluate: --dataset {args.dataset} is {_inputs(asked)}; the run's network "
                           f"was trained on {_inputs(trained)} ({run['dataset']}): evaluate on a dataset of that kind")
        config.update(dataset=args.dataset, data_root=args.data_root)  # None: that dataset's own default
    elif args.data_root is not None:
        config["data_root"] = args.data_root
    config["shots"] = args.shots or config["shots"]
    config["query_shots"] = args.query_shots or config["query_shots"]
    if args.download:
        _refuse_download_that_does_nothing(config["dataset"], "bilevel-maml evaluate")
    config["download"] = args.download or config["download"]
    return config


def _inputs(spec) -> str:
    """A dataset's tasks and inputs in words: what decides whether a network trained on another takes them."""
    kind = "regression" if spec.regression else "classification"
    if spec.vector_inputs:
        return f"{kind} of vectors of {spec.in_channels} feature{'s' if spec.in_channels != 1 else ''}"
    return f"{kind} of {spec.in_channels}×{spec.image_size}×{spec.image_size} images"


def _setting(config: dict) -> str:
    ways = "" if DATASETS[config["dataset"]].regression else f"{config['ways']}w"
    return f"{ways}{config['shots']}s-{config['query_shots']}q"


def command_plot(args: argparse.Namespace) -> dict:
    folders = list(dict.fromkeys(Path(folder) for folder in args.output))
    for folder in folders:
        if not folder.is_dir():
            raise BadInput(f"bilevel-maml plot: --output {str(folder)!r} is not a run folder")
    if args.file is not None:
        _check_writable_folder("--file", Path(args.file).parent)
        if not args.file.lower().endswith(".png"):
            raise BadInput(f"bilevel-maml plot: --file {args.file!r} must end in .png")
    from bilevel_maml.plots import compare_runs, plot_run, results_table

    if len(folders) == 1:
        drawn = plot_run(folders[0], args.file, dpi=args.dpi)
        print(f"learning curves of {folders[0]} (from {drawn['source']}) written to {drawn['path']}", flush=True)
        return drawn
    drawn = compare_runs(folders, args.file, dpi=args.dpi)
    print(results_table(drawn["rows"], drawn["seed_groups"]))
    print(f"learning curves of {len(folders)} runs written to {drawn['path']}", flush=True)
    return drawn
