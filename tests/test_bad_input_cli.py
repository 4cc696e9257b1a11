"""Bad input at the console script: one line naming the flag (or key, or file), the bad value and
what is allowed; exit status 2; no traceback; nothing written, no existing run touched."""

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bilevel_maml import cli

SINUSOID = ["--dataset", "sinusoid", "--iterations", "2", "--wandb", "disabled"]


def omniglot_zips(folder: Path, small1: bytes, small2: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "images_background_small1.zip").write_bytes(small1)
    (folder / "images_background_small2.zip").write_bytes(small2)
    return folder


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# (command line with {run}, {new}, {tmp} placeholders, files to create, what the one line must say)
CASES = [
    (["train", "--width", "-3"], {}, ["--width", "'-3'", "integer >= 1"]),
    (["train", "--width", "wide"], {}, ["--width", "'wide'", "integer >= 1"]),
    (["train", "--ways", "0"], {}, ["--ways", "'0'", "integer >= 1"]),
    (["train", "--dataset", "sinusoid", "--ways", "3"], {}, ["--ways 3", "sinusoid", "regression", "drop --ways"]),
    (["train", "--query-shots", "0"], {}, ["--query-shots", "'0'", "integer >= 1"]),
    (["train", "--inner-steps", "1.5"], {}, ["--inner-steps", "'1.5'", "integer >= 1"]),
    (["train", "--eval-inner-steps", "0"], {}, ["--eval-inner-steps", "'0'", "integer >= 1"]),
    (["train", "--gradient-clipping", "-1"], {}, ["--gradient-clipping", "'-1'", "finite number >= 0"]),
    (["train", "--meta-lr-schedule", "linear"], {}, ["--meta-lr-schedule", "'linear'", "'cosine'"]),
    (["train", "--algorithm", "maml++", "--option", "cosine_lr=false", "--meta-lr-schedule", "cosine"],
     {}, ["--meta-lr-schedule cosine", "cosine_lr=false", "disagree"]),
    (["train", "--min-meta-lr=-1e-5"], {}, ["--min-meta-lr", "'-1e-5'", "finite number >= 0"]),
    (["train", "--min-meta-lr", "nan"], {}, ["--min-meta-lr", "'nan'", "finite number >= 0"]),
    (["train", "--min-meta-lr", "1e-5"], {}, ["--min-meta-lr 1e-05", "constant", "--meta-lr-schedule cosine"]),
    (["train", "--algorithm", "maml++", "--option", "cosine_lr=false", "--min-meta-lr", "1e-5"], {},
     ["--min-meta-lr 1e-05", "constant", "--meta-lr-schedule cosine"]),
    (["train", "--inner-lr", "0"], {}, ["--inner-lr", "'0'", "positive finite number"]),
    (["train", "--inner-lr", "nan"], {}, ["--inner-lr", "'nan'", "positive finite number"]),
    (["train", "--meta-lr=-1e-3"], {}, ["--meta-lr", "'-1e-3'", "positive finite number"]),
    (["train", "--meta-batch-size", "0"], {}, ["--meta-batch-size", "'0'", "integer >= 1"]),
    (["train", "--iterations", "ten"], {}, ["--iterations", "'ten'", "integer >= 1"]),
    (["train", "--lam=-inf"], {}, ["--lam", "'-inf'", "positive finite number"]),
    (["train", "--cg-iterations", "0"], {}, ["--cg-iterations", "'0'", "integer >= 1"]),
    (["train", "--lam", "0.5"], {}, ["--lam 0.5 (iMAML's proximal strength λ): maml does not use it"]),
    (["train", "--algorithm", "imaml", "--option", "lam=0.3"], {}, ["imaml's lam is not an option: --lam sets it"]),
    (["train", "--dataset", "omniglot-small", "--download"], {},
     ["--download with --dataset omniglot-small", "--dataset omniglot", "drop --download"]),
    (["train", "--dataset", "sinusoid", "--download"], {}, ["--download with --dataset sinusoid", "drawn"]),
    (["evaluate", "--output", "{run}", "--download"], {}, ["evaluate: --download with --dataset sinusoid"]),
    (["train", "--algorithm", "fomaml", "--cg-iterations", "3"], {},
     ["--cg-iterations 3 (iMAML's conjugate-gradient iterations): fomaml does not use it", "--algorithm imaml"]),
    (["train", "--seed", "-1"], {}, ["--seed", "'-1'", "integer >= 0"]),
    (["train", "--valid-every", "0"], {}, ["--valid-every", "'0'", "integer >= 1"]),
    (["train", "--test-tasks", "0"], {}, ["--test-tasks", "'0'", "integer >= 1"]),
    (["train", "--checkpoint-every", "0"], {}, ["--checkpoint-every", "'0'", "integer >= 1"]),
    (["train", "--dist-timeout", "0"], {}, ["--dist-timeout", "'0'", "positive finite number"]),
    (["train", "--algorithm", "reptil"], {}, ["--algorithm", "'reptil'", "known: anil, boil,", "--plugin MODULE"]),
    (["train", "--algorithm", "maml++", "--option", "multistep=1"], {}, ["--option", "'multistep'", "bn_momentum"]),
    (["train", "--option", "multi_step_loss"], {}, ["--option", "NAME=VALUE", "'multi_step_loss'"]),
    (["train", "--dataset", "imagenet"], {}, ["--dataset", "'imagenet'", "known: omniglot-small, omniglot, mini-imagenet",
                                             "register_dataset"]),
    (["train", "--optimizer", "rmsprop"], {}, ["--optimizer", "'rmsprop'", "'adam'"]),
    (["train", "--model", "vgg"], {}, ["--model", "'vgg'", "known: conv4, conv4-strided, resnet12, mlp", "register_model"]),
    (["train", "--dtype", "float16"], {}, ["--dtype", "'float16'", "'float32'"]),
    (["train", "--precision", "fp8"], {}, ["--precision", "'fp8'", "'tf32'"]),
    (["train", "--wandb", "maybe"], {}, ["--wandb", "'maybe'", "'offline'"]),
    (["train", "--device", "tpu"], {}, ["--device", "'tpu'", "cpu, cuda or cuda:N"]),
    (["train", "--precision", "bf16"], {}, ["--precision", "bf16", "on cpu use fp32"]),
    (["train", "--model", "conv4"], {}, ["--model mlp", "'conv4'"]),
    (["train", "--output", "{tmp}/a-file"], {"a-file": b"x"}, ["--output", "a-file", "is a file"]),
    (["train", "--output", "{tmp}/a-file/run"], {"a-file": b"x"}, ["--output", "a-file/run", "cannot be written"]),
    (["train", "--data-root", "{tmp}/a-file"], {"a-file": b"x"}, ["--data-root", "a-file", "is a file"]),
    (["train", "--dataset", "omniglot-small", "--data-root", "{tmp}/empty-zips"], {"empty-zips": (b"", b"")},
     ["images_background_small1.zip", "not a readable zip archive"]),
    (["train", "--dataset", "omniglot-small", "--data-root", "{tmp}/garbage-zips"],
     {"garbage-zips": (b"PK\x03\x04" + os.urandom(300), b"junk")},
     ["images_background_small1.zip", "not a readable zip archive"]),
    (["train", "--dataset", "omniglot-small", "--data-root", "{tmp}/bad-png"],
     {"bad-png": (zip_of({"images_background_small1/Greek/character01/0394_01.png": b"not a png"}),
                  zip_of({"images_background_small2/Greek/character01/0394_02.png": b"not a png"}))},
     ["0394_01.png", "does not decode as an image"]),
    (["train", "--config", "{tmp}/bad.yaml"], {"bad.yaml": b"ways: [5\nshots: 1\n"}, ["--config", "bad.yaml", "not valid YAML"]),
    (["train", "--config", "{tmp}/bad.toml"], {"bad.toml": b"ways = = 5\n"}, ["--config", "bad.toml", "not valid TOML"]),
    (["train", "--config", "{tmp}/list.yaml"], {"list.yaml": b"- 1\n- 2\n"}, ["list.yaml", "must map option names"]),
    (["train", "--config", "{tmp}/words.yaml"], {"words.yaml": b"ways: five\n"}, ["ways = 'five'", "words.yaml", "integer >= 1"]),
    (["train", "--config", "{tmp}/neg.yaml"], {"neg.yaml": b"width: -3\n"}, ["width = -3", "neg.yaml", "integer >= 1"]),
    (["train", "--config", "{tmp}/lr.toml"], {"lr.toml": b'meta_lr = "fast"\n'}, ["meta_lr = 'fast'", "lr.toml", "positive finite"]),
    (["train", "--config", "{tmp}/nan.toml"], {"nan.toml": b"inner_lr = nan\n"}, ["inner_lr = nan", "nan.toml", "positive finite"]),
    (["train", "--config", "{tmp}/many.yaml"], {"many.yaml": b"ways: [5, 6]\n"}, ["ways = [5, 6]", "many.yaml", "single"]),
    (["train", "--config", "{tmp}/flag.yaml"], {"flag.yaml": b"per-step: 3\n"}, ["per-step = 3", "flag.yaml", "true or false"]),
    (["train", "--config", "{tmp}/flag.toml"], {"flag.toml": b'download = "yes"\n'},
     ["download = 'yes'", "flag.toml", "true or false"]),
    (["train", "--config", "{tmp}/typo.yaml"], {"typo.yaml": b"waays: 5\n"}, ["unknown option 'waays'", "typo.yaml"]),
    (["train", "--config", "{tmp}/absent.yaml"], {}, ["--config", "absent.yaml", "does not exist"]),
    (["train", "--config", "{tmp}/conf.json"], {"conf.json": b"{}"}, ["--config", "conf.json", ".yaml, .yml or .toml"]),
    (["train", "--output", "{run}"], {}, ["already holds a run", "bilevel-maml resume --output"]),
    (["train", "--output", "{run}", "--resume-if-exists", "--meta-lr", "0.01"], {},
     ["--resume-if-exists", "holds another run", "meta_lr (the run's 0.001, this command's 0.01)"]),
    (["train", "--output", "{run}", "--resume-if-exists", "--dataset", "sinusoid", "--iterations", "1", "--wandb",
      "disabled"], {}, ["holds another run", "iterations (the run's 2, this command's 1: fewer)"]),
    (["resume", "--output", "{run}", "--iterations", "0"], {}, ["--iterations", "'0'", "integer >= 1"]),
    (["resume", "--output", "{run}", "--device", "tpu"], {}, ["--device", "'tpu'"]),
    (["resume", "--output", "{tmp}/nowhere"], {}, ["--output", "nowhere", "is not a run folder"]),
    (["evaluate", "--output", "{run}", "--test-tasks", "0"], {}, ["--test-tasks", "'0'", "integer >= 1"]),
    (["evaluate", "--output", "{run}", "--eval-inner-steps", "-2"], {}, ["--eval-inner-steps", "'-2'", "integer >= 1"]),
    (["evaluate", "--checkpoint", "{tmp}/notes.pt"], {"notes.pt": b"just text"}, ["notes.pt", "damaged or not a checkpoint"]),
    (["evaluate", "--checkpoint", "{tmp}/config.json"], {"config.json": b'{"algorithm": "maml"}'},
     ["config.json", "damaged or not a checkpoint (not a file torch.save writes"]),  # not "could run code"
    (["evaluate", "--checkpoint", "{tmp}/absent.pt"], {}, ["absent.pt", "no checkpoint"]),
    (["evaluate", "--checkpoint", "{tmp}/weights.pt"], {"weights.pt": saved(torch.nn.Linear(3, 2).state_dict())},
     ["weights.pt is not a bilevel_maml checkpoint of format 1", "a state dict of 2 tensors (weight, bias)",
      "what bilevel-maml train writes in RUN/checkpoints/"]),
    (["evaluate", "--checkpoint", "{tmp}/newer.pt"], {"newer.pt": saved({"format": 2, "engine": {}})},
     ["newer.pt is not a bilevel_maml checkpoint of format 1", "it is of format 2"]),
    (["evaluate", "--checkpoint", "{tmp}/listed.pt"], {"listed.pt": saved([1, 2])}, ["listed.pt", "it holds a list"]),
    (["evaluate", "--checkpoint", "{tmp}/bare.pt"], {"bare.pt": saved({"format": 1})},
     ["bare.pt lacks the engine state a bilevel_maml checkpoint holds"]),
    (["evaluate"], {}, ["--output RUN_FOLDER or --checkpoint FILE"]),
    (["evaluate", "--output", "{run}", "--dataset", "omniglot-small"], {},
     ["--dataset omniglot-small is classification of 1×28×28 images", "trained on regression", "(sinusoid)"]),
    (["evaluate", "--output", "{run}", "--dataset", "omniglott"], {}, ["--dataset", "unknown dataset 'omniglott'"]),
    (["evaluate", "--output", "{run}", "--shots", "0"], {}, ["--shots", "'0'", "integer >= 1"]),
    (["bench", "--device", "tpu"], {}, ["bench", "--device", "'tpu'", "cpu, cuda or cuda:N"]),
    (["bench", "--steps", "1", "0"], {}, ["bench", "--steps", "'0'", "integer >= 1"]),
    (["bench", "--repeats", "0"], {}, ["bench", "--repeats", "'0'", "integer >= 1"]),
    (["bench", "--meta-batch-size", "-2"], {}, ["bench", "--meta-batch-size", "'-2'", "integer >= 1"]),
    (["bench", "--memory-steps", "five"], {}, ["bench", "--memory-steps", "'five'", "integer >= 1"]),
    (["bench", "--data-root", "{tmp}/nowhere"], {}, ["bench", "nowhere", "does not exist"]),
    *([(["bench", "--device", "cuda"], {}, ["bench", "--device", "'cuda'", "CUDA is not available"])]
      if not torch.cuda.is_available() else []),
]


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("existing") / "run"
    done = subprocess.run([sys.executable, "-m", "bilevel_maml", "train", *SINUSOID, "--output", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare(tmp: Path, files: dict) -> None:
    for name, content in files.items():
        path = tmp / name
        if isinstance(content, tuple):
            omniglot_zips(path, *content)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def case_arguments(index, argv, files, tmp_root: Path, run: Path):
    tmp = tmp_root / f"case{index}"
    tmp.mkdir()
    prepare(tmp, files)
    new = tmp / "new-run"
    argv = [a.format(run=run, new=new, tmp=tmp) for a in argv]
    if argv[0] == "train" and "--output" not in argv:
        argv += ["--output", str(new)]
    if argv[0] == "train" and "--dataset" not in argv and "--config" not in argv and "--model" not in argv:
        argv += SINUSOID
    elif argv[0] == "train" and "--dataset" not in argv:
        argv += ["--dataset", "sinusoid", "--wandb", "disabled"]
    return argv, tmp, new


def run_console_script(index, argv, files, tmp_root: Path, run: Path):
    argv, tmp, new = case_arguments(index, argv, files, tmp_root, run)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run([Path(sys.executable).parent / "bilevel-maml", *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    return argv, done, new


def run_in_process(index, argv, files, tmp_root: Path, run: Path, monkeypatch):
    """What the console script's main() does with the same arguments, without the few seconds of
    importing torch again in a new process."""
    argv, tmp, new = case_arguments(index, argv, files, tmp_root, run)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            status = cli.main(argv)
    except BaseException as error:  # an escaped exception is what a console user would see as a traceback
        status, err = 1, io.StringIO(f"Traceback (escaped {type(error).__name__}: {error})\nfrom main()")
    return argv, subprocess.CompletedProcess(argv, status, "", err.getvalue()), new


#: every tenth case runs through the installed console script in its own process (3 s of imports
#: each); the others call the same main() in this process (the checks are the same)
CONSOLE_EVERY = 10


def test_bad_input_gets_one_line_and_exit_status_2_and_touches_nothing(tmp_path, existing_run, monkeypatch):
    assert len(CASES) >= 40
    before = snapshot(existing_run)
    console = [i for i in range(len(CASES)) if i % CONSOLE_EVERY == 0]
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {i: pool.submit(run_console_script, i, *CASES[i][:2], tmp_path, existing_run) for i in console}
        in_process = {i: run_in_process(i, *CASES[i][:2], tmp_path, existing_run, monkeypatch)
                      for i in range(len(CASES)) if i not in started}
        outcomes = [started[i].result() if i in started else in_process[i] for i in range(len(CASES))]
    failures = []
    for (argv, done, new), (_, _, expected) in zip(outcomes, CASES):
        lines = done.stderr.strip().splitlines()
        problems = []
        if done.returncode != 2:
            problems.append(f"exit status {done.returncode}")
        if "Traceback" in done.stderr or len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        missing = [text for text in expected if text not in done.stderr]
        if missing:
            problems.append(f"does not say {missing}")
        if new.exists():
            problems.append(f"created {new}")
        if problems:
            failures.append(f"{' '.join(argv)}: {'; '.join(problems)}\n    {done.stderr.strip()[-600:]}")
    assert not failures, "\n".join(failures)
    assert snapshot(existing_run) == before


def test_the_decoded_image_cache_loads_without_running_code(tmp_path, omniglot_root, monkeypatch):
    from bilevel_maml.data import omniglot

    loaded = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loaded.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    omniglot.load_characters(omniglot_root, tmp_path)  # decodes and writes the cache
    characters = omniglot.load_characters(omniglot_root, tmp_path)  # reads it back
    assert loaded == [True] and len(characters["small1"]) > 0
    cache = next(tmp_path.rglob("decoded-*px.pt"))
    cache.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="decoded-image cache .* is unreadable"):
        again = omniglot.load_characters(omniglot_root, tmp_path)
    assert again.keys() == characters.keys()
