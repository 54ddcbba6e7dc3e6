"""Every job's and benchmark's command line, found by walking ``jobs/`` and ``benchmarks/``: ``--help`` and argument errors.

``--help`` must say how to run the job locally and on a cluster and give
every option's default (or say it is required); a bad command line must end
with argparse's message and exit code 2, never a traceback. Only parsing runs
here: ``--help`` and usage errors exit before a job imports Ray or touches data.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import benchmarks
import jobs
from pipeline import storage
from pipeline.data.reference import make_synthetic

JOBS = sorted(m.name for m in pkgutil.iter_modules(jobs.__path__) if m.name != "__init__")


def _help(name: str, capsys, argv=("--help",)) -> str:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exc:
        module.main(list(argv))
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err
    return captured.out


def _options(help_text: str) -> dict[str, str]:
    """Each ``--flag`` entry of an argparse help text -> its help, lines joined."""
    entries, current = {}, None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):  # an option's first line: "  --flag VALUE   its help"
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and re.match(r"^ {3,}\S", line):  # its help, wrapped
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


# Benchmarks run through the same skeleton (pipeline.cli.run_job); benchmarks.procmem is a helper, not a command.
BENCHMARKS = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                    if hasattr(importlib.import_module(f"benchmarks.{m.name}"), "main"))
COMMANDS = [f"jobs.{name}" for name in JOBS] + [f"benchmarks.{name}" for name in BENCHMARKS]


def test_every_job_is_found():
    assert {"make_dataset", "pretrain_reference_clip", "score", "train", "report", "demo"} <= set(JOBS)
    assert {"gpu", "pruner_scale", "pruning", "reporting", "score_shards", "scoring"} <= set(BENCHMARKS)


@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_local_and_cluster_commands_and_every_default(module, capsys):
    """``benchmarks.scoring --help`` lists every command's options."""
    text = _help(module, capsys)
    assert f"python -m {module}" in text
    assert f"ray job submit --working-dir . -- python -m {module}" in text
    options = {flag: entry for flag, entry in _options(text).items() if flag not in ("-h", "--help")}
    assert options, f"no options found in {module} --help"
    missing = [flag for flag, entry in options.items() if "(default" not in entry and "(required" not in entry]
    assert not missing, f"{module} --help gives no default for {missing}"
    assert any("(default" in entry for entry in options.values())


def test_subcommand_flags_are_their_config_fields(capsys):
    """``benchmarks.scoring COMMAND --help``: one flag per field of the command's config, and no other."""
    from benchmarks import scoring as bench_scoring

    for command, (config_cls, _, _) in bench_scoring.COMMANDS.items():
        flags = set(_options(_help("benchmarks.scoring", capsys, argv=(command, "--help")))) - {"-h"}
        assert flags == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(config_cls)}


@pytest.mark.parametrize("module", [f"jobs.{name}" for name in JOBS])
def test_help_answers_without_importing_torch(module):
    """A fresh process: ``--help`` needs the flags alone, not torch or open_clip (seconds to import here)."""
    code = ("import contextlib, importlib, io, sys\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            f"    importlib.import_module({module!r}).main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'ray.train') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def _fresh_process(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh Python with no Ray to join (it starts its own); it must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("module, config, fields, state_api", [
    ("pipeline.score.job", "ScoreConfig", {"input": "in.parquet"}, False),  # a file here (the job checks it is there)
    ("jobs.demo", "DemoConfig", {}, True),
])
def test_a_job_starts_ray_with_the_dashboard_only_if_it_trains(tmp_path, module, config, fields, state_api):
    """A fresh process runs a job's config as the job does: Ray's State API, which the dashboard serves and
    Ray Train watches its controller through, is there for the jobs that train, not for the score job.
    (``jobs.train``'s config takes the default, as the demo's does: one fresh Ray each is about 16 s here.)"""
    if "input" in fields:
        fields = {**fields, "input": str(tmp_path / fields["input"])}
        open(fields["input"], "wb").close()
    code = ("import time\n"
            "import ray\n"
            "from pipeline.cli import execute\n"
            f"from {module} import {config}\n"
            "def work(cfg):\n"  # the State API answers within 5 s (its server may still be starting), or not
            "    from ray.util.state import list_actors\n"
            "    deadline = time.monotonic() + 5\n"
            "    while True:\n"
            "        try:\n"
            "            list_actors(address=ray.get_runtime_context().gcs_address, limit=1)\n"
            "            return True\n"
            "        except ray.util.state.exception.RayStateApiException:\n"
            "            if time.monotonic() > deadline:\n"
            "                return False\n"
            "            time.sleep(0.5)\n"
            f"cfg = {config}(**{fields!r}, **{{{config}.OUTPUT: {str(tmp_path / 'out')!r}}})\n"
            "print('state api:', execute(cfg, work))\n"
            "ray.shutdown()\n")
    done = _fresh_process(code)
    assert f"state api: {state_api}" in done.stdout.splitlines(), done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("module", COMMANDS)
def test_unknown_option_exits_2_with_a_message(module, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--no-such-option"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "error:" in err and "Traceback" not in err


# Where users copy commands from: the README, the jobs' and examples' docstrings, the cluster file.
DOCUMENTED = ["README.md", "cluster.yaml", *sorted(f"jobs/{name}.py" for name in JOBS), "examples/own_loop.py"]


# ... and where they copy a figure's command from: the benchmarks' record and docstrings (built, not only flagged).
RECORDED = [*DOCUMENTED, "BENCHMARKS.md", *sorted(f"benchmarks/{name}.py" for name in BENCHMARKS)]


def _documented_commands(files=DOCUMENTED, package: str = "jobs") -> list[tuple[str, str, list[str]]]:
    """``(file, module, arguments)`` of every ``python -m PACKAGE.NAME ...`` written out in ``files``.

    Continued lines are joined; shell comments and what follows ``&&``, ``|``
    or ``;`` are cut; fragments (``...``) and placeholders (``jobs.NAME``, ``--seed S``) are skipped.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = {"jobs": JOBS, "benchmarks": BENCHMARKS}[package]
    found = []
    for name in files:
        with open(os.path.join(root, name)) as f:
            text = f.read()
        if name.endswith(".py"):
            text = ast.get_docstring(ast.parse(text)) or ""
        text = re.sub(r"\\\n\s*", " ", text)  # a shell line continued
        for match in re.finditer(rf"python -m ({package}\.\w+)([^\n`]*)", text):
            module, rest = match.groups()
            if text[match.start() - 1] == "`":  # named in prose, not a command to copy
                continue
            line_start = text.rfind("\n", 0, match.start()) + 1
            if text.count("`", line_start, match.start()) % 2:  # inside `...` in prose, which may wrap lines
                rest = text[match.end(1):text.find("`", match.end(1))].replace("\n", " ")
            rest = re.split(r"\s(?:#|&&|\||;|&)(?:\s|$)", rest)[0]
            placeholder = any(re.fullmatch(r"[A-Z]+", token) for token in rest.split())
            if module[len(package) + 1:] in names and "..." not in rest and not placeholder:
                found.append((name, module, rest.split()))
    return found


def _recorded_commands() -> list[tuple[str, str, list[str]]]:
    return [c for package in ("jobs", "benchmarks") for c in _documented_commands(RECORDED, package)]


@pytest.mark.parametrize("where,module,argv", _recorded_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_builds_its_config(where, module, argv, monkeypatch):
    """Each value a documented command gives is one its job takes: the config is built as the job builds it (its
    checks of the flags' values included; not the checks that read inputs). BENCHMARKS.md's reference-model
    command gave --out a file name months after the job took a folder; a policy's unread --keep-ratio (refused
    since a464f73) would go unseen by the flag-name check above."""
    from pipeline.cli import config_parser, parse_config

    built = []

    def build_only(config_cls, argv, work, *, doc, prog, check=None, positional=()):
        parser = config_parser(config_cls, doc, positional)
        parser.prog = prog
        built.append(parse_config(config_cls, parser, argv))
        return 0

    target = importlib.import_module(module)
    monkeypatch.setattr(target, "run_job", build_only)
    try:
        target.main(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: python -m {module} {' '.join(argv)}: refused (exit {exc.code})")
    assert len(built) == 1


def test_recorded_commands_are_found():
    commands = _recorded_commands()
    assert {module for _, module, _ in commands} >= {"jobs.train", "jobs.score", "benchmarks.pruning"}
    assert sum(where == "BENCHMARKS.md" for where, _, _ in commands) > 100


def test_documented_commands_are_found():
    commands = _documented_commands()
    assert {module for _, module, _ in commands} == {f"jobs.{name}" for name in JOBS}
    assert {name for name, _, _ in commands} >= {"README.md", "examples/own_loop.py", "jobs/score.py"}


@pytest.mark.parametrize("where,module,argv", _documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_uses_real_flags_and_every_required_one(where, module, argv, capsys):
    """A command a user copies from the docs names only flags the job has, and every one it requires."""
    options = _options(_help(module, capsys))
    flags = {token.split("=")[0] for token in argv if token.startswith("--")}
    # argparse lists a bool option as "--flag, --no-flag"; _options keys it by "--flag".
    unknown = [f for f in flags if f not in options
               and not (f.startswith("--no-") and "--" + f[len("--no-"):] in options)]
    assert not unknown, f"{where}: python -m {module} uses flags it does not have: {unknown}"
    required = [flag for flag, entry in options.items() if "(required)" in entry]
    assert not set(required) - flags, f"{where}: python -m {module} lacks {sorted(set(required) - flags)}"


def test_local_paths_are_refused_where_ray_workers_are_not_on_this_machine(tmp_path):
    """A cluster's head, as cluster.yaml makes it, has no CPUs: every read and write task runs on another
    node, so a local --input/--output would name a folder on each worker's own disk (the score job then
    committed whatever landed on the head's). A fresh process with a Ray of 0 CPUs on its node stands for it."""
    data, out, model = str(tmp_path / "data"), str(tmp_path / "scores"), str(tmp_path / "model.pt")
    open(model, "wb").close()  # a checkpoint on this machine's disk, which the scoring actors elsewhere would not see
    source, built = str(tmp_path / "shards"), str(tmp_path / "built")
    reference, demo_out = str(tmp_path / "ref-clip"), str(tmp_path / "demo")
    storage.write_shards(make_synthetic(n=16, seed=0).splits["train"], source)
    code = ("import os\n"
            "import ray\n"
            "from jobs import demo, make_dataset, pretrain_reference_clip, score\n"
            "from pipeline.cli import check_shared_paths\n"
            "from pipeline.score.job import ScoreConfig\n"
            "ray.init(num_cpus=0, include_dashboard=False)\n"
            f"print('rc', score.main(['--input', {data!r}, '--output', {out!r}]))\n"
            "check_shared_paths(ScoreConfig(input='s3://bucket/data', output='gs://bucket/scores'))\n"
            "check_shared_paths(ScoreConfig(input='s3://b/d', output='s3://b/s', pretrained='laion2b_s34b_b79k'))\n"
            f"print('rc', score.main(['--input', 's3://b/d', '--output', 's3://b/s', '--pretrained', {model!r}]))\n"
            # make_dataset reads --columns shards with Ray Data's tasks, which run on the other nodes.
            f"print('rc', make_dataset.main(['--source', {source!r}, '--columns', 'mmdp', '--out', {built!r}]))\n"
            # Outputs the driver writes on the head, which the next jobs' workers elsewhere would read.
            f"print('rc', pretrain_reference_clip.main(['--data', 's3://b/d', '--out', {reference!r}]))\n"
            f"print('rc', demo.main(['--out', {demo_out!r}]))\n"
            "os.environ['MMDP_SHARED_FS'] = '1'\n"  # a file system every node mounts alike
            f"check_shared_paths(ScoreConfig(input={data!r}, output={out!r}))\n"
            "print('urls and a shared file system pass')\n"
            "ray.shutdown()\n")
    done = _fresh_process(code)
    assert done.stdout.splitlines()[-6:] == ["rc 2"] * 5 + ["urls and a shared file system pass"], done.stdout
    for flags in (f"--input {data}, --output {out}", f"--pretrained {model}", f"--source {source}",
                  f"--out {reference}", f"--out {demo_out}"):
        assert f"{flags}: a local path, but this Ray cluster has 1 node(s) and 0 CPUs on this one" in done.stderr, \
            done.stderr[-3000:]
    for folder in (out, built, reference, demo_out):  # refused before the output was marked pending
        assert not os.path.exists(folder), folder


def test_variables_a_submitted_job_sets_itself_are_not_passed_again(monkeypatch):
    """``ray.init`` under ``ray job submit`` fails on any variable both the job's runtime env and the driver's
    name, even alike (every job exited 2); the job's reach its workers, so the driver leaves them out."""
    from pipeline.cli import unsubmitted

    ours = {"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "5", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert unsubmitted(ours) == ours  # not a submitted job
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "5"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert unsubmitted(ours) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert unsubmitted(ours) == ours
    job["runtime_env"]["env_vars"] = {"AWS_ENDPOINT_URL": "http://minio:9000"}  # against --s3-endpoint
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL=http://127.0.0.1:9000 here, but the job's runtime env "
                                         "sets AWS_ENDPOINT_URL=http://minio:9000"):
        unsubmitted(ours)
