"""The benchmark script runs end to end and reports what it promises (timings are not asserted:
speed targets are read from its output, see README "Speed")."""

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def run_benchmark(script: str, data_root, out, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``benchmarks/<script>`` run with ``--data-root data_root --json out`` and ``args``: the finished
    process (its exit status checked) and the JSON report it wrote."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--data-root", str(data_root), *args,
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-8000:]  # a rank's own error sits above torchrun's summary
    return done, json.loads(Path(out).read_text())


def rendered(out) -> str:
    """The tables ``benchmarks/render_tables.py`` prints for the report ``out``."""
    tables = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render_tables.py"), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr[-2000:]
    return tables.stdout


@pytest.mark.slow  # its every section on the CPU; the default suite keeps test_bench_runs_the_benchmark_under_its_own_name
def test_meta_iteration_benchmark_reports_ratios_limits_and_memory(tmp_path, omniglot_root):
    out = tmp_path / "bench.json"
    done, report = run_benchmark(
        "meta_iteration.py", omniglot_root, out,
        "--meta-batch-size", "2", "--steps", "1", "--queries", "1", "--memory-steps", "1", "2", "--repeats", "1",
        "--implementations", "ours maml vectorized", "ours maml per-task", "ours fomaml vectorized",
        "learn2learn maml", "learn2learn fomaml", "textbook maml loop", "ours maml vectorized (cuda graph)",
        "--breakdown", "--sections", "meta-iteration")
    assert "device: cpu" in done.stdout and "conv throughput" in done.stdout and "precision fp32" in done.stdout
    assert "ours maml vectorized (cuda graph): skipped, CUDA graphs need a CUDA device" in done.stdout
    assert "× the meta-iterations/s of learn2learn maml" in done.stdout
    assert "FOMAML vs MAML (vectorized)" in done.stdout
    assert "ours imaml vectorized: peak memory at 2 inner steps is" in done.stdout
    assert report["precision"] == "fp32" and all(row["precision"] == "fp32" for row in report["rows"])
    assert report["notes"] == ["ours maml vectorized (cuda graph): skipped, CUDA graphs need a CUDA device"]
    names = {row["implementation"] for row in report["rows"]}
    assert names == {"ours maml vectorized", "ours maml per-task", "ours fomaml vectorized", "learn2learn maml",
                     "learn2learn fomaml", "textbook maml loop"}
    maml = [r for r in report["rows"] if r["implementation"] in ("ours maml vectorized", "textbook maml loop")]
    assert maml[0]["gflop"] == maml[1]["gflop"] > 0  # both read against MAML's own FLOP count
    assert all(r["seconds"] > 0 and r["limit_seconds"] > 0 for r in report["rows"])
    # --breakdown: every row's profiled time charged to layer types; conv4 spends some in each
    for row in report["rows"]:
        by_layer = row["seconds_by_layer"]
        assert set(by_layer) == {"convolution", "batch norm", "max-pool", "relu", "other"}
        assert all(by_layer[kind] > 0 for kind in ("convolution", "batch norm", "max-pool", "relu")), by_layer
    tables = rendered(out)
    assert "| 1 | 1 | ours maml vectorized |" in tables and "Share of one profiled" in tables


def one_step(name, monkeypatch):
    from implementations import IMPLEMENTATIONS

    from bilevel_maml.models import Conv4

    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr, **_: torch.optim.SGD(params, lr=1.0))
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).expand(4, 5)
    tasks = (torch.randn(4, 5, 1, 16, 16, generator=generator, dtype=torch.float64), labels,
             torch.randn(4, 5, 1, 16, 16, generator=generator, dtype=torch.float64), labels)
    torch.manual_seed(0)
    model = Conv4(5, hidden=4, image_size=16).double()
    IMPLEMENTATIONS[name](model, tasks, 2)()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name", [
    "ours maml vectorized", "ours maml per-task", "learn2learn maml", "forward-over-reverse maml",
    "ours maml vectorized (pool before norm)", "ours maml vectorized (plain block order)",
    "ours maml vectorized (unfolded first conv)", "ours maml vectorized (grouped conv grads)",
    "ours maml vectorized (pytorch norm grads)",
    "ours maml per-task (pytorch norm grads)", "ours maml vectorized (primitive-op norm)",
    pytest.param("torch.compile maml", marks=pytest.mark.slow),
    # on CPU, Inductor skips the CUDA graphs: this checks the step that row compiles
    pytest.param("torch.compile maml (cuda graph)", marks=pytest.mark.slow)])
def test_every_second_order_implementation_takes_the_textbook_step(name, monkeypatch):
    """Same tasks, same start: one meta-iteration of each MAML implementation moves θ like the textbook loop.
    (Plain SGD instead of the benchmark's Adam: Adam's first step turns the round-off gradients of the conv
    biases that BatchNorm cancels into full ±lr steps.)"""
    textbook, other = one_step("textbook maml loop", monkeypatch), one_step(name, monkeypatch)
    for a, b in zip(textbook, other):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("name", ["ours maml per-task (pool before norm)", "ours fomaml vectorized (pool before norm)",
                                  "ours imaml vectorized (pool before norm)", "ours imaml vectorized (grouped conv grads)",
                                  "ours imaml vectorized (pytorch norm grads)",
                                  "ours fomaml vectorized (pytorch norm grads)"])
def test_every_reformulated_row_takes_its_plain_rows_step(name, monkeypatch):
    """The reordered blocks and the grouped convolution and PyTorch's BatchNorm derivatives compute the
    same function: each "(pool before norm)", "(grouped conv grads)" and "(pytorch norm grads)" row
    moves θ like the same algorithm and execution computed the default way (FOMAML and iMAML included,
    not only MAML)."""
    plain = one_step(name.rsplit(" (", 1)[0], monkeypatch)
    reordered = one_step(name, monkeypatch)
    for a, b in zip(plain, reordered):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


def test_the_torch_func_sketch_gets_batchnorm_second_order_terms_wrong(monkeypatch):
    """Pins a PyTorch defect (functorch issue 534: batch_norm's backward batching rule is wrong for
    grad_input): vmap over torch.func.grad through training-mode BatchNorm, then backward, gives a
    meta-gradient off by ~1e-2 here, so the sketch's time is for a different (wrong) update. Ours
    differentiates outside vmap and matches the textbook (test above). If this fails, PyTorch fixed
    it: update the README's Speed section."""
    textbook, sketch = one_step("textbook maml loop", monkeypatch), one_step("torch.func vmap sketch", monkeypatch)
    assert max((a - b).abs().max().item() for a, b in zip(textbook, sketch)) > 1e-3


@pytest.mark.slow
def test_benchmark_runs_finn_et_al_strided_network(tmp_path, omniglot_root):
    """--model conv4-strided times learn2learn's OmniglotCNN architecture: same rows, its own FLOPs
    (stride-2 convolutions compute a quarter of the positions of the max-pool network's)."""
    reports = {}
    for model in ("conv4", "conv4-strided"):
        out = tmp_path / f"{model}.json"
        done, report = run_benchmark(
            "meta_iteration.py", omniglot_root, out,
            "--model", model, "--meta-batch-size", "2", "--steps", "1", "--queries", "1", "--memory-steps",
            "--repeats", "1", "--implementations", "ours maml vectorized", "learn2learn maml",
            "--sections", "meta-iteration")
        assert f"{model}-64, 28×28" in done.stdout
        reports[model] = report
    assert reports["conv4-strided"]["model"] == "conv4-strided"
    strided, pooled = (reports[m]["rows"][0]["gflop"] for m in ("conv4-strided", "conv4"))
    assert 0 < strided < pooled / 2


@pytest.mark.slow
def test_equal_budget_benchmark_trains_each_learner_for_the_budget_and_scores_it(tmp_path, omniglot_root):
    out = tmp_path / "budget.json"
    done, report = run_benchmark(
        "equal_budget.py", omniglot_root, out,
        "--model", "conv4-strided", "--budget-minutes", "0.05", "--meta-batch-size", "2", "--test-tasks", "20",
        "--learners", "learn2learn maml", "ours maml", "--device", "cpu")
    assert report["settings"]["model"] == "conv4-strided"
    assert report["settings"]["precision"] == "fp32" and "precision fp32" in done.stdout
    assert [r["learner"] for r in report["results"]] == ["learn2learn maml", "ours maml"]
    assert [r["execution"] for r in report["results"]] == ["eager", "eager"]  # CUDA graphs are CUDA's
    for row in report["results"]:
        assert row["meta_iterations"] >= 1 and row["train_seconds"] >= 3.0  # trained for the budget
        assert row["tasks"] == 20 and 0.0 <= row["accuracy"] <= 1.0
    assert "ours maml: " in done.stdout and "learn2learn MAML" in done.stdout
    tables = rendered(out)
    assert "model conv4-strided" in tables
    assert "device cpu, precision fp32" in tables and "| ours maml | eager | " in tables


@pytest.mark.slow
def test_equal_iterations_benchmark_trains_each_algorithm_as_long_and_states_its_settings(tmp_path, omniglot_root):
    out = tmp_path / "iterations.json"
    done, report = run_benchmark(
        "equal_iterations.py", omniglot_root, out,
        "--plugin", "examples.protomaml", "--algorithms", "maml", "maml++", "protomaml", "--iterations", "2",
        "--meta-batch-size", "2", "--width", "8", "--test-tasks", "10", "--device", "cpu")
    assert report["settings"]["precision"] == "fp32" and report["settings"]["iterations"] == 2
    assert [r["algorithm"] for r in report["rows"]] == ["maml", "maml++", "protomaml"]  # a user's variant too
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["training_seconds"] > 0 for r in report["rows"])
    tables = rendered(out)
    assert "device cpu, precision fp32, 10 test tasks" in tables and "| maml++ | " in tables


@pytest.mark.slow
def test_distributed_benchmark_states_precision_and_execution_of_each_row(tmp_path, omniglot_root):
    """Two gloo processes only (torchrun's start-up is most of the time; tests/test_distributed.py covers 1 vs 2)."""
    out = tmp_path / "scaling.json"
    done, report = run_benchmark(
        "distributed.py", omniglot_root, out,
        "--processes", "2", "--meta-batch-size", "2", "--iterations", "1", "--warmup", "0",
        "--precision", "fp32")
    rows = report["rows"]
    assert [(r["processes"], r["backend"], r["tasks_per_rank"]) for r in rows] == [(2, "gloo", 1)]
    assert all(r["precision"] == "fp32" and r["execution"] == "eager" and r["tasks_per_second"] > 0 for r in rows)
    tables = rendered(out)
    assert "device cpu, precision fp32;" in tables and "| 2 | 1 | gloo | 1 | eager | " in tables


@pytest.mark.slow
def test_end_to_end_evaluation_sampling_and_replay_check_sections(tmp_path, omniglot_root):
    out = tmp_path / "sections.json"
    done, report = run_benchmark(
        "meta_iteration.py", omniglot_root, out,
        "--meta-batch-size", "4", "--steps", "1", "--sections", "end-to-end", "evaluation", "sampling",
        "replay-check", "--end-to-end-iterations", "2", "--eval-tasks", "20", "--repeats", "2")
    assert [r["setup"] for r in report["end_to_end"]] == [
        "ours, device sampler, eager", "ours, learn2learn sampler, eager", "learn2learn (its own loop)"]
    assert all(r["tasks_per_second"] > 0 and r["inner_steps"] == 1 for r in report["end_to_end"])
    evaluation = {r["setup"]: r for r in report["evaluation"]}
    assert evaluation["vectorized, device sampler"]["tasks_per_call"] > 1
    assert evaluation["task by task, device sampler"]["tasks_per_call"] == 1
    # the same tasks, scored vectorized and one at a time: the same accuracy
    assert evaluation["vectorized, device sampler"]["accuracy"] == pytest.approx(
        evaluation["task by task, device sampler"]["accuracy"], abs=1e-6)
    assert {r["sampler"] for r in report["sampling"]} == {"device sampler", "learn2learn sampler"}
    assert "sampling 4 tasks, device sampler:" in done.stdout
    host = {r["measured"]: r["microseconds"] for r in report["replay_check"]}
    # the check is part of a replayed meta-iteration's host work, and cheaper than comparing everything
    assert 0 < host["RecordedState"] < min(host["every setting compared"], host["a replayed meta-iteration on the host"])
    assert "check before a replay: " in done.stdout
    tables = rendered(out)
    assert "| 1 | ours, device sampler, eager |" in tables and "| device sampler |" in tables
    assert "| RecordedState |" in tables


def test_bench_runs_the_benchmark_under_its_own_name():
    done = subprocess.run([sys.executable, "-m", "bilevel_maml", "bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: bilevel-maml bench "), done.stdout[:200]
    assert "--sections" in done.stdout and "--precision" in done.stdout


def jax_or_skip():
    return pytest.importorskip("jax", reason="jax is optional (pip install jax optax to run the JAX row)")


def test_the_jax_row_computes_the_textbook_meta_gradient():
    """float64 (JAX's x64 mode, in a subprocess): MAML's meta-gradient from the JAX implementation equals the
    textbook PyTorch loop's, max-pool and strided networks, 2 inner steps."""
    jax_or_skip()
    script = """
import sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import jax; jax.config.update("jax_enable_x64", True)
import jax_maml
from implementations import functional_loss
from bilevel_maml.models import Conv4
worst = 0.0
for downsample in ("max-pool", "stride"):
    torch.manual_seed(0)
    model = Conv4(5, hidden=6, image_size=28, downsample=downsample).double()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).expand(3, 5)
    xs, xq = (torch.randn(3, 5, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(2))
    loss, params0 = functional_loss(model), list(model.parameters())
    total = 0
    for i in range(3):
        params = params0
        for _ in range(2):
            params = [p - 0.4 * d for p, d in zip(params, torch.autograd.grad(loss(params, xs[i], labels[i]), params,
                                                                               create_graph=True))]
        total = total + loss(params, xq[i], labels[i]) / 3
    reference = torch.autograd.grad(total, params0)
    theirs = jax_maml.meta_gradient(model, (xs, labels, xq, labels), 2, 0.4)
    names = [n for n, _ in model.named_parameters()]
    assert max(float(r.abs().max()) for r in reference) > 1e-2
    worst = max(worst, max(float((torch.as_tensor(theirs[n]) - r).abs().max()) for n, r in zip(names, reference)))
print(worst)
"""
    done = subprocess.run([sys.executable, "-c", script, str(REPO / "benchmarks")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-10


def test_the_benchmark_times_jax_after_checking_it(tmp_path, omniglot_root):
    jax_or_skip()
    out = tmp_path / "jax.json"
    done, report = run_benchmark(
        "meta_iteration.py", omniglot_root, out,
        "--meta-batch-size", "2", "--steps", "1", "--queries", "1", "--memory-steps", "--repeats", "1",
        "--sections", "meta-iteration", "--implementations", "ours maml vectorized", "jax maml (jit + vmap)")
    assert "JAX (cpu: cpu): meta-gradient at 1 inner step within" in done.stdout
    assert "× JAX's time per meta-iteration" in done.stdout
    rows = {r["implementation"]: r for r in report["rows"]}
    assert rows["jax maml (jit + vmap)"]["seconds"] > 0 and rows["jax maml (jit + vmap)"]["peak_mb"] is None


@pytest.mark.slow
def test_the_xla_grouped_convolution_comparison_checks_both_compute_the_same_before_timing():
    """benchmarks/xla_cpu_grouped_conv.py (why the JAX row is slow on a CPU) times a computation only
    after XLA's and PyTorch's grouped convolution and filter gradient agree; without JAX, one line."""
    script = [sys.executable, str(REPO / "benchmarks" / "xla_cpu_grouped_conv.py"), "--tasks", "2", "--repeats", "1"]
    done = subprocess.run(script, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("jax") is None:
        assert done.returncode == 2 and done.stderr.strip() == (
            "error: jax is not importable: pip install jax (beside the venv, e.g. --target /tmp/jax)")
        return
    assert done.returncode == 0, done.stderr[-8000:]  # a rank's own error sits above torchrun's summary
    assert "XLA and PyTorch agree" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["forward", "filter"] and all(float(row[-1].rstrip("x")) > 0 for row in rows)


def cuda_only_tests() -> set[str]:
    """``file::function`` of every test skipped where CUDA is not available, found in the sources."""
    import ast

    found = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "skipif" in ast.unparse(d) and "cuda.is_available" in ast.unparse(d) for d in node.decorator_list):
                found.add(f"tests/{path.name}::{node.name}")
    return found


def test_the_gpu_session_script_names_rows_and_tests_that_exist():
    """benchmarks/gpu_session.sh runs on a GPU machine only; here: every implementation it asks for
    exists, and its test selection picks up every test that needs CUDA (in any test file) and nothing else."""
    import re

    from implementations import IMPLEMENTATIONS

    script = (REPO / "benchmarks" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_session.sh")]).returncode == 0
    rows = re.findall(r'"((?:ours|jax|learn2learn|torch\.compile) [^"]*)"', script)
    assert len(rows) >= 11 and all(name in IMPLEMENTATIONS for name in rows), rows
    (files,) = re.findall(r"^gpu_test_files=(.*)$", script, re.MULTILINE)
    (options,) = re.findall(r"python3 -m pytest (.*) \$gpu_test_files$", script, re.MULTILINE)
    collected = subprocess.run(["bash", "-c", f"{sys.executable} -m pytest --collect-only {options} {files}"],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    selected = {line.split("[")[0] for line in collected.stdout.splitlines() if "::" in line}
    needed = cuda_only_tests()
    assert len(needed) >= 5 and selected == needed, collected.stdout[-2000:]


def test_the_gpu_session_script_keeps_within_its_budget_and_always_prints_its_summary(tmp_path):
    """The device call is stopped at 10 minutes: each step gets what is left of the script's budget, a
    step that would get under 30 s is skipped with a line saying so, and the summary is printed. Here with
    stand-ins for python3 and nvidia-smi that take a second each, and a budget of 33 s."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\nsleep 1\necho '  steps  1  stand-in row'\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Stand-in GPU, 1.0, 1 MiB'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BILEVEL_MAML_DATA": str(tmp_path),
           "GPU_SESSION_SECONDS": "33"}
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(out)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0 and time.monotonic() - started < 20, done.stderr
    assert "== Stand-in GPU" in done.stdout and "stand-in row" in (out / "gpu-tests.txt").read_text()
    assert "stand-in row" in (out / "meta_iteration-tf32.txt").read_text()
    skipped = (out / "gpu_kernels--pytorch-norm-grads.txt").read_text()
    assert skipped.startswith("skipped: the session's 33 s ran out") and "skipped:" in done.stdout, done.stdout


@pytest.mark.slow
def test_gpu_kernels_counts_ops_on_the_cpu_and_sees_what_a_derivative_change_removes(omniglot_root, monkeypatch,
                                                                                     capsys):
    """``gpu_kernels.py --ops`` needs no GPU: it counts the ops one meta-iteration dispatches, and with
    PyTorch's BatchNorm derivatives it finds the ~380 more that the closed form removes at 1 step."""
    path = REPO / "benchmarks" / "gpu_kernels.py"
    monkeypatch.setattr(sys, "path", list(sys.path))

    def ops(*flags):
        argv = ["--ops", "--device", "cpu", "--steps", "1", "--top", "3", "--data-root", str(omniglot_root), *flags]
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
        runpy.run_path(str(path), run_name="__main__")
        out = capsys.readouterr().out
        assert "1 inner step(s), cpu" in out and "ops besides views" in out, out
        return int(out.strip().splitlines()[-1].split()[-1])

    closed_form, pytorchs = ops(), ops("--pytorch-norm-grads")
    assert 300 < pytorchs - closed_form < pytorchs / 2, (closed_form, pytorchs)


@pytest.mark.parametrize("script, argv, says", [
    ("meta_iteration.py", ["--queries", "0"], ["meta_iteration.py", "--queries", "'0'", "integer >= 1"]),
    ("equal_budget.py", ["--device", "tpu"], ["equal_budget.py", "--device", "'tpu'", "cpu, cuda or cuda:N"]),
    ("equal_budget.py", ["--budget-minutes", "0"], ["--budget-minutes", "'0'", "positive finite number"]),
    ("equal_budget.py", ["--data-root", "nowhere"], ["equal_budget.py", "'nowhere'", "does not exist"]),
    ("equal_budget.py", ["--device", "cpu", "--precision", "tf32"], ["equal_budget.py", "'tf32'", "on cpu use fp32"]),
    ("equal_iterations.py", ["--meta-lr", "-1"], ["equal_iterations.py", "--meta-lr", "'-1'", "positive finite"]),
    ("equal_iterations.py", ["--device", "cpu", "--precision", "bf16"], ["equal_iterations.py", "'bf16'", "on cpu use fp32"]),
    ("equal_iterations.py", ["--plugin", "no_such_variants"],
     ["equal_iterations.py: plugin module 'no_such_variants' could not be imported"]),
    ("distributed.py", ["--processes", "2", "0"], ["distributed.py", "--processes", "'0'", "integer >= 1"]),
    ("distributed.py", ["--device", "cpu", "--precision", "bf16"], ["distributed.py", "'bf16'", "on cpu use fp32"]),
    ("render_tables.py", [str(REPO / "README.md")], ["render_tables.py", "README.md is not JSON"]),
    ("gpu_kernels.py", ["--grouped-conv-grads", "--steps", "1", "0"], ["gpu_kernels.py", "--steps", "'0'", "integer >= 1"]),
    ("gpu_kernels.py", ["--device", "cpu"], ["gpu_kernels.py", "--device", "'cpu'", "needs --ops"]),
    ("gpu_kernels.py", ["--ops", "--device", "tpu"], ["gpu_kernels.py", "--device", "'tpu'", "cpu, cuda or cuda:N"]),
])
def test_benchmark_scripts_refuse_bad_input_in_one_line(script, argv, says, tmp_path, monkeypatch, capsys):
    """Run directly (not through `bilevel-maml bench`), the scripts answer bad input as the CLI does:
    one line naming the flag, the value and what is allowed, exit status 2, before any measurement.
    (Each script runs as ``__main__`` in this process, as its own interpreter would run it, without
    importing torch again.)"""
    path = REPO / "benchmarks" / script
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(path), run_name="__main__")
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, err[-2000:]
    assert all(text in lines[0] for text in says), lines[0]
    assert out == ""
