"""The one job skeleton: a config dataclass becomes the command line, the log, the saved config and the run.

Every job and benchmark is ``run_job(Config, argv, work, ...)``: one flag per
field of a frozen dataclass (so the resolved config a run logs and saves is
exactly what the user asked for, and ``--help`` with defaults is written once,
in the dataclass), logging, the object-store settings, Ray when the config
says the job uses it (:func:`connect_ray`, the library's one ``ray.init``),
the output folder's commit protocol (:mod:`pipeline.storage`) and one
exit-code convention: 0 done, 2 a bad command line or bad input (its
message, no traceback). :func:`execute` is the same run for a config built
in code (the benchmarks, the demo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing

HELP = "help"
# Settings (not secrets) a job's workers need to reach the same object store as its driver.
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "STORAGE_EMULATOR_HOST")
# Ray Data's own setting: seconds between its progress lines when the output is not a terminal.
PROGRESS_ENV, PROGRESS_SECONDS = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", 30
log = logging.getLogger("mmdp")


def option(default, text: str, **extra):
    """A config field with its ``--help`` text (and, e.g., ``choices``)."""
    return dataclasses.field(default=default, metadata={HELP: text, **extra})


def _base_type(annotation):
    """``int`` for ``int``, ``str`` for ``str | None``, ``(str, ...)`` tuples as element type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        return (typing.get_args(annotation)[0],)
    return annotation


def config_parser(config_cls, description: str, positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A parser with one ``--flag`` per field of ``config_cls`` (``field_name`` -> ``--field-name``).

    Fields without a default are required. ``tuple[str, ...]`` fields take a
    comma-separated list; ``bool`` fields become ``--flag/--no-flag``.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind = _base_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING else field.default_factory())
        text = field.metadata.get(HELP, "")
        text += " (required)" if required else f" (default: {_show(default)})"
        if field.name in positional:
            many = {"nargs": "+"} if isinstance(kind, tuple) else {"type": kind}
            parser.add_argument(field.name, help=text, metavar=field.name.upper(), **many)
            continue
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(kind, tuple):
            parser.add_argument(flag, type=_comma_list(kind[0]), default=default, required=required, help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, required=required, help=text,
                                choices=field.metadata.get("choices"))
    return parser


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _comma_list(kind):
    def parse(text: str):
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def parse_config(config_cls, parser: argparse.ArgumentParser, argv=None, check=None):
    """Parse ``argv`` into ``config_cls``; a ``ValueError`` (or an input missing: ``InputError``)
    from the config or ``check(cfg)`` is a usage error (exit 2), raised before any output exists."""
    from pipeline.storage import InputError, configure_s3

    args = vars(parser.parse_args(argv))
    try:
        cfg = config_cls(**args)
        if check is not None:
            configure_s3(getattr(cfg, "s3_endpoint", None))  # a check may read the store already
            check(cfg)
    except (ValueError, InputError) as exc:
        parser.error(str(exc))
    return cfg


def config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, default=str)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# Set to 1: local paths are on a file system every node mounts alike (check_shared_paths).
SHARED_FS_ENV = "MMDP_SHARED_FS"


def connect_ray(*, dashboard: bool = True, **init_args) -> None:
    """Start a local Ray, or join a running one: the library's one ``ray.init``.

    Joins the cluster under ``ray job submit``, or the one ``ray start
    --head`` started on this machine (``ray.init``'s own lookup); otherwise
    starts Ray for this process. ``dashboard=False`` starts it without the
    dashboard: its nine Python processes cost a local run about 6
    CPU-seconds at start and about 0.56 GB (PSS) while it runs
    (BENCHMARKS.md, "Ray's dashboard in a local run"), but they also serve
    Ray's State API, through which Ray Train watches its controller (to
    free the workers' placement group if the controller dies), so only a
    job that does not train does without it (a config's ``RAY_DASHBOARD =
    False``, read by :func:`execute`). The driver's object-store settings
    (never credentials) reach every worker, also on a cluster that the
    driver joins (there, its environment is not the workers').
    ``init_args`` go to ``ray.init`` (a benchmark's ``num_cpus``, the
    tests' temp folder). Does nothing when Ray is up.

    Progress: on a terminal, Ray Data's bars. Otherwise (a log file, ``ray
    job submit``) Ray Data logs each stage's row counts as lines, every
    :data:`PROGRESS_SECONDS` (``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL``
    overrides it), from the driver and from the tasks that feed Ray Train
    workers alike, so a log holds no bar redraws (nor colour codes around
    the workers' line prefixes).
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return
    if not dashboard and not str(init_args.get("address") or os.environ.get("RAY_ADDRESS", "")).startswith("ray://"):
        init_args["include_dashboard"] = False  # ray.init ignores it when it joins a cluster
    env = {k: os.environ[k] for k in STORE_ENV if k in os.environ}
    terminal = sys.stdout.isatty()
    if not terminal:
        os.environ.setdefault(PROGRESS_ENV, str(PROGRESS_SECONDS))
        env[PROGRESS_ENV] = os.environ[PROGRESS_ENV]
        # Workers' lines reach the driver's log without colour codes around their "(Actor pid=...)" prefix.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    env = unsubmitted(env)
    ray.init(runtime_env={"env_vars": env} if env else None, **init_args)
    # Bars drawn inside Ray workers are sent to the driver to redraw; off a terminal those
    # workers take Ray Data's logging path instead (their own output is never a terminal).
    ray.data.DataContext.get_current().use_ray_tqdm = terminal


def unsubmitted(env: dict[str, str]) -> dict[str, str]:
    """``env``, the variables the driver passes its workers, less those the submitted job's own runtime env
    sets (``ray job submit --runtime-env-json '{"env_vars": ...}'``): they reach the workers already, and
    ``ray.init`` fails on a variable both name, even with the same value.

    Ray gives a job's driver its job config in ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (nothing outside a job).

    Raises:
        ValueError: a variable both set to different values (``--s3-endpoint`` against the job's
            ``AWS_ENDPOINT_URL``): the workers would get the job's.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    submitted = ((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}
    for name, value in env.items():
        if name in submitted and submitted[name] != value:
            raise ValueError(f"{name}={value} here, but the job's runtime env sets {name}={submitted[name]}, "
                             "which its workers would get: give one")
    return {k: v for k, v in env.items() if k not in submitted}


def check_shared_paths(cfg) -> None:
    """Refuses local paths that a cluster's other nodes would not see: the fields a config names in
    ``SHARED_PATHS`` (read or written by Ray's workers, not the driver alone) and the files it names in
    ``SHARED_FILES`` that exist on this machine, when Ray has more than
    one node or none of its CPUs on the driver's (a cluster's head, as ``cluster.yaml`` makes it).

    Each node would read or write its own disk under that path: a score job's rows committed from
    the head's disk alone, a run's checkpoint not found. ``MMDP_SHARED_FS=1`` allows them, for a
    file system that every node mounts at the same path (NFS).

    Raises:
        ValueError: naming the flags, what the cluster has, and what to pass instead.
    """
    from pipeline import storage

    paths, files = getattr(type(cfg), "SHARED_PATHS", ()), getattr(type(cfg), "SHARED_FILES", ())
    # Files the workers read may also be names (a hub tag for --pretrained): paths where they exist here.
    local = [name for name in (*paths, *files)
             if (value := getattr(cfg, name, None)) is not None and storage.is_local(value)
             and (name in paths or os.path.exists(os.path.expanduser(value)))]
    if not local or os.environ.get(SHARED_FS_ENV) == "1":
        return
    nodes, cpus_here = ray_layout()
    if nodes > 1 or cpus_here == 0:
        flags = ", ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in local)
        raise ValueError(f"{flags}: a local path, but this Ray cluster has {nodes} node(s) and "
                         f"{cpus_here:g} CPUs on this one, so its workers would each read and write their own "
                         "disk there; pass s3:// or gs:// URLs (or set MMDP_SHARED_FS=1 for a folder that "
                         "every node mounts at this same path)")


def ray_layout() -> tuple[int, float]:
    """(Ray's live nodes, CPUs on the driver's node): ``(1, n > 0)`` is one machine, where Ray's workers run
    beside the driver; a cluster's head, as ``cluster.yaml`` makes it, has none."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    return len(nodes), sum(n["Resources"].get("CPU", 0) for n in nodes if n["NodeID"] == here)


def check_apart(output_flag: str, output: str, input_flag: str, source: str, read: list[str] | None = None) -> None:
    """Refuse an output that is or holds an input, or lies in a folder the job reads of it (``read``; default:
    the whole input): the output would replace the input, or be read as part of it by the next run.

    Raises:
        ValueError: naming both flags.
    """
    from pipeline import storage

    if storage.contains(output, source) or any(storage.contains(folder, output) for folder in (read or [source])):
        raise ValueError(f"--{output_flag} {output} and --{input_flag} {source} overlap: the output would replace "
                         "or be read as the input; give it a folder of its own")


def execute(cfg, work):
    """Run a parsed config the way its job runs: the part of :func:`run_job` after parsing.

    The config class says what the job needs: ``OUTPUT``, the name of the
    field holding its output folder, which is marked pending, given the
    config as ``config.json``, and committed when ``work(cfg)`` returns
    (:mod:`pipeline.storage`); ``RAY = True``, Ray connected first (without
    the dashboard where ``RAY_DASHBOARD = False``: :func:`connect_ray`). A config's
    ``check_inputs()`` method, where it has one, runs before the output is
    marked pending (a re-run that fails it leaves the earlier output
    committed). Returns what ``work(cfg)`` returns; its exceptions propagate
    and leave the output uncommitted. Benchmarks call this with configs they build.
    """
    from pipeline import storage

    if getattr(type(cfg), "RAY", False):
        connect_ray(dashboard=getattr(type(cfg), "RAY_DASHBOARD", True))
        check_shared_paths(cfg)
    if hasattr(cfg, "check_inputs"):
        cfg.check_inputs()
    if not getattr(type(cfg), "OUTPUT", None):
        return work(cfg)
    check_not_anothers(getattr(cfg, type(cfg).OUTPUT), cfg)
    with storage.output(getattr(cfg, type(cfg).OUTPUT)) as out:
        storage.write_json(dataclasses.asdict(cfg), storage.join(out, "config.json"))
        return work(cfg)


def check_not_anothers(out: str, cfg) -> None:
    """Refuse an output folder that holds another job's output, by its ``config.json`` (which :func:`execute`
    writes into every output): the job would mark it pending and replace that config, leaving a run, a
    dataset or a score table no reader takes (a report's --out given a training run's folder). Another
    job's config shares under half of its fields with this one's (a run of an older or newer mmdp of the
    same job shares nearly all).

    Raises:
        ValueError: naming the folder and what to do.
    """
    from pipeline import storage

    config = storage.join(out, "config.json")
    if not storage.exists(config):
        return
    try:
        saved = storage.read_json(config)
    except (ValueError, OSError):
        return  # not a job's config: not ours to judge
    if not isinstance(saved, dict):
        return
    fields = {f.name for f in dataclasses.fields(cfg)}
    if len(fields & set(saved)) * 2 < len(fields | set(saved)):
        raise ValueError(f"{out}: holds another job's output (its config.json has {', '.join(sorted(saved)[:6])}, "
                         "...); this job would replace it: choose another output folder")


def run_job(config_cls, argv, work, *, doc: str, prog: str, check=None, positional: tuple[str, ...] = ()) -> int:
    """The body of every job's and benchmark's ``main``: parse, log, :func:`execute`, exit code.

    A usage error, or a ``ValueError`` from ``check(cfg)``, exits with code 2
    (argparse's message). Then logging and the object-store settings (a
    config's ``s3_endpoint``) are set up and the config is logged.
    ``work(cfg)`` returns a summary (printed as JSON) or None; an
    :class:`~pipeline.storage.InputError` or ``ValueError`` from it is bad
    input: its message, exit code 2, the output left uncommitted.
    """
    from pipeline import storage

    parser = config_parser(config_cls, doc, positional)
    parser.prog = prog
    cfg = parse_config(config_cls, parser, argv, check)
    setup_logging()
    storage.configure_s3(getattr(cfg, "s3_endpoint", None))
    log.info("config:\n%s", config_json(cfg))
    try:
        summary = execute(cfg, work)
    except (storage.InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0
