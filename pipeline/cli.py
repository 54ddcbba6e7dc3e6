"""One flag per config field: build an argparse parser from a frozen dataclass.

Every job's options map one to one onto its config dataclass, so the resolved
config that a run logs and saves is exactly what the user asked for, and the
``--help`` text (with defaults) is written once, in the dataclass.
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
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
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
            parser.add_argument(field.name, help=text, type=kind)
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
    """Parse ``argv`` into ``config_cls``; a ``ValueError`` from ``check(cfg)`` is a usage error (exit 2)."""
    args = vars(parser.parse_args(argv))
    try:
        cfg = config_cls(**args)
        if check is not None:
            check(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, default=str)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def start_job(config_cls, description: str, argv, prog: str | None = None, check=None) -> object:
    """The start of every job's ``main``: parse, set up logging, point S3 access, log the config.

    Usage errors (and a ``ValueError`` from ``check(cfg)``) exit with code 2;
    a config's ``s3_endpoint`` field, where it has one, applies to the whole
    process (and the Ray workers it starts).
    """
    from pipeline import storage

    parser = config_parser(config_cls, description)
    if prog:
        parser.prog = prog
    cfg = parse_config(config_cls, parser, argv, check)
    setup_logging()
    storage.configure_s3(getattr(cfg, "s3_endpoint", None))
    log.info("config:\n%s", config_json(cfg))
    return cfg


def run_ray_job(config_cls, description: str, argv, work) -> int:
    """The body of every Ray job's ``main``: parse, log the config, connect Ray, run, summarise.

    ``ray.init()`` starts a local Ray here and joins the cluster under ``ray
    job submit``. A :class:`pipeline.storage.ShardError` or ``ValueError`` from
    ``work(cfg)`` is bad input: its message and exit code 2, no traceback.
    """
    import ray

    from pipeline import storage

    cfg = start_job(config_cls, description, argv)
    if not ray.is_initialized():
        # The driver's S3 settings reach every worker, also on a cluster that
        # the driver joins (there, its environment is not the workers').
        env = {k: os.environ[k] for k in S3_ENV if k in os.environ}
        ray.init(runtime_env={"env_vars": env} if env else None)
    try:
        summary = work(cfg)
    except (storage.ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
