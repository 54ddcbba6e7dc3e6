"""Every job's and benchmark's command line, found by walking ``jobs/`` and ``benchmarks/``: ``--help`` and argument errors.

``--help`` must say how to run the job locally and on a cluster and give
every option's default (or say it is required); a bad command line must end
with argparse's message and exit code 2, never a traceback. Only parsing runs
here: ``--help`` and usage errors exit before a job imports Ray or touches data.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re

import pytest

import benchmarks
import jobs

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


@pytest.mark.parametrize("module", COMMANDS)
def test_unknown_option_exits_2_with_a_message(module, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--no-such-option"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "error:" in err and "Traceback" not in err
