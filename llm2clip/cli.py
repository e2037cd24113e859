"""One command line over the stage table.

    llm2clip <stage> --params params.yaml [--set section.key=value ...] --<input> DIR --<output> DIR
    llm2clip <stage> --common-json '{...}' --config-json '{...}' --<input> DIR --<output> DIR

Every subcommand and its ``--<input>``/``--<output>`` flags come from
:data:`llm2clip.stages.STAGES`; nothing here is written per stage. One more subcommand is not a
stage: ``llm2clip import <kind> SRC DST`` turns a released LLM2CLIP checkpoint into our artifacts
(:mod:`llm2clip.importers`).

A user's mistake (a missing path, no S3 credentials, an unreachable endpoint, a denied
permission, a bad format, a config error) is one ERROR line that says what to do, exit code 2:
:data:`USER_ERRORS` is the table. ``--debug`` (before or after the stage name, or
``LLM2CLIP_DEBUG=1``) adds the traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip.config import ConfigError, load_params, load_sections
from llm2clip.io import StageError, subdirectories
from llm2clip.stages import STAGES, launch

log = logging.getLogger("llm2clip")

DEBUG_ENV = "LLM2CLIP_DEBUG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# ------------------------------------------------------------------------------- user errors
# One table: the error classes users hit -> one line that says what to do, and the exit code.
# botocore / huggingface_hub classes are matched by name (no import on the happy path).

Matcher = Callable[[BaseException], bool]
S3_DENIED = ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
             "AllAccessDisabled", "ExpiredToken", "InvalidToken", "AccountProblem")
HUB_ERRORS = ("LocalEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
              "EntryNotFoundError", "GatedRepoError", "OfflineModeIsEnabled", "HFValidationError")


@dataclass
class ErrorContext:
    """What a message may name: the stage and the S3 endpoint (known once the config loaded)."""

    stage: str
    endpoint: str = ""

    def s3(self) -> str:
        return self.endpoint or "AWS (common.s3_endpoint_url is empty)"


@dataclass(frozen=True)
class ErrorRule:
    """One row of :data:`USER_ERRORS`.

    Attributes:
        name: Short id of the row.
        matches: Whether one exception (of the raised one's cause/context chain) is of this kind.
        message: The line the user sees: what went wrong and what to do.
        exit_code: 2 for the user's errors; 1 for failures that are not (torchrun workers died).
    """

    name: str
    matches: Matcher
    message: Callable[[Any, ErrorContext], str]
    exit_code: int = 2


def _named(package: str, *names: str) -> Matcher:
    """Matches instances of classes called ``names`` defined in ``package`` (subclasses too)."""
    def matches(exc: BaseException) -> bool:
        return any(c.__name__ in names and c.__module__.partition(".")[0] == package for c in type(exc).__mro__)
    return matches


def _s3_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode", "")
    return str((response.get("Error") or {}).get("Code") or status)


def _client_error(*codes: str) -> Matcher:
    is_client_error = _named("botocore", "ClientError")
    return lambda exc: is_client_error(exc) and _s3_code(exc) in codes


def _errno(*numbers: int) -> Matcher:
    return lambda exc: isinstance(exc, OSError) and exc.errno in numbers


def _kind(cls: type[BaseException]) -> Matcher:
    return lambda exc: isinstance(exc, cls)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _path(exc: BaseException) -> str:
    """The path an OSError names (both for a rename), else its message."""
    names = [str(n) for n in (getattr(exc, "filename", None), getattr(exc, "filename2", None)) if n]
    return " -> ".join(names) or _text(exc)


def _s3_op(exc: Any) -> str:
    return f"{_s3_code(exc)} on {getattr(exc, 'operation_name', '?')}"


def _command(exc: subprocess.CalledProcessError) -> str:
    cmd = [str(c) for c in (exc.cmd if isinstance(exc.cmd, (list, tuple)) else [exc.cmd])]
    return "torchrun" if "torch.distributed.run" in cmd else Path(cmd[0]).name


USER_ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule("interrupted", _kind(KeyboardInterrupt), lambda e, c: f"{c.stage}: interrupted", 130),
    ErrorRule("stage", _kind(StageError), lambda e, c: f"{c.stage} failed: {_text(e)}"),
    ErrorRule("config", _kind(ConfigError), lambda e, c: f"configuration error: {_text(e)}"),
    ErrorRule("workers", _kind(subprocess.CalledProcessError),
              lambda e, c: f"{c.stage} failed: {_command(e)} exited with {e.returncode} "
                           "(the workers' errors are logged above)", 1),
    ErrorRule("s3_credentials", _named("botocore", "NoCredentialsError", "PartialCredentialsError"),
              lambda e, c: f"{c.stage}: no usable S3 credentials ({_text(e)}): set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and a credentials file) for {c.s3()}"),
    ErrorRule("s3_unreachable", _named("botocore", "ConnectionError", "ReadTimeoutError"),
              lambda e, c: f"{c.stage}: cannot reach the S3 endpoint ({_text(e)}): check "
                           f"common.s3_endpoint_url (now {c.s3()}), the network, and that the server is up"),
    ErrorRule("s3_endpoint_url", lambda e: isinstance(e, ValueError) and str(e).startswith("Invalid endpoint"),
              lambda e, c: f"{c.stage}: common.s3_endpoint_url is not a URL ({_text(e)}): "
                           "use http(s)://host[:port], or empty for AWS"),
    ErrorRule("s3_denied", _client_error(*S3_DENIED),
              lambda e, c: f"{c.stage}: S3 refused access ({_s3_op(e)}): check that the credentials are "
                           f"valid for {c.s3()} and may read and write the bucket"),
    ErrorRule("s3_no_bucket", _client_error("NoSuchBucket"),
              lambda e, c: f"{c.stage}: the S3 bucket does not exist ({_text(e)}): create it or fix the "
                           "s3:// path"),
    ErrorRule("s3_not_found", _client_error("NoSuchKey", "404", "NotFound"),
              lambda e, c: f"{c.stage}: not found on S3 ({_s3_op(e)}): check the s3:// path, or run "
                           "the stage that writes it"),
    ErrorRule("s3_failing", _client_error("InternalError", "ServiceUnavailable", "SlowDown", "503", "500"),
              lambda e, c: f"{c.stage}: the S3 store kept failing after retries ({_s3_op(e)}: {_text(e)}): check "
                           f"{c.s3()}, then run the stage again (an output without manifest.json is unfinished: "
                           "no later stage reads it)"),
    ErrorRule("model_not_found", _named("huggingface_hub", *HUB_ERRORS),
              lambda e, c: f"{c.stage}: model not found ({_text(e)}): give an existing local directory or "
                           "a pkg:// spec; a hub id needs the network or a warm Hugging Face cache"),
    ErrorRule("json", _kind(json.JSONDecodeError),
              lambda e, c: f"{c.stage}: invalid JSON ({_text(e)}): fix the file, or re-run the stage "
                           "that wrote it"),
    ErrorRule("encoding", _kind(UnicodeDecodeError),
              lambda e, c: f"{c.stage}: a file is not valid {e.encoding} text ({_text(e)}): convert it "
                           "to UTF-8"),
    ErrorRule("is_a_directory", _kind(IsADirectoryError),
              lambda e, c: f"{c.stage}: {_path(e)} is a directory where a file is expected: check the path"),
    ErrorRule("not_a_directory", _kind(NotADirectoryError),
              lambda e, c: f"{c.stage}: {_path(e)}: part of this path is a file, not a directory: "
                           "check the path"),
    ErrorRule("not_found", _kind(FileNotFoundError),
              lambda e, c: f"{c.stage}: {_path(e)} does not exist: check the path, or run the stage "
                           "that writes it"),
    ErrorRule("permission", _kind(PermissionError),
              lambda e, c: f"{c.stage}: permission denied: {_path(e)}: use a path this user may read "
                           "and write, or change its permissions"),
    ErrorRule("no_space", _errno(errno.ENOSPC, errno.EDQUOT),
              lambda e, c: f"{c.stage}: no space left writing {_path(e)}: free space or write elsewhere"),
    ErrorRule("read_only", _errno(errno.EROFS),
              lambda e, c: f"{c.stage}: {_path(e)} is on a read-only filesystem: write elsewhere"),
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, then what it was raised from or while handling, outermost first.

    s3fs, transformers and aiobotocore wrap the error that says what happened.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain) and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def explain_error(exc: BaseException, context: ErrorContext) -> tuple[str, int] | None:
    """The one line and exit code for a user error; None for anything else (a bug: traceback).

    The first row of :data:`USER_ERRORS` that matches any exception of ``exc``'s chain wins, so
    an ``s3fs`` ``PermissionError`` raised from a botocore ``AccessDenied`` reads as the latter.
    The chain is only searched when ``exc`` itself is a known kind or an ``OSError`` wrapper:
    an unknown error (a bug) raised while handling a user error keeps its traceback.
    """
    if not isinstance(exc, OSError) and not any(rule.matches(exc) for rule in USER_ERRORS):
        return None
    chain = _chain(exc)
    for rule in USER_ERRORS:
        for candidate in chain:
            if rule.matches(candidate):
                return " ".join(rule.message(candidate, context).split()), rule.exit_code
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2clip",
        description="LLM2CLIP pipeline stages. Each stage reads params and writes a directory.",
    )
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=os.environ.get("LLM2CLIP_LOG_LEVEL", "INFO").upper())
    parser.add_argument("--debug", action="store_true", default=os.environ.get(DEBUG_ENV, "") not in ("", "0"),
                        help="show the traceback of an error (also after the stage name)")
    # after the stage name too; SUPPRESS keeps the value given before it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for spec in STAGES.values():
        p = sub.add_parser(spec.name, help=spec.summary, description=spec.summary, parents=[debug])
        p.add_argument("--params", type=Path, help="params YAML file (e.g. params.yaml)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override one value, e.g. --set prepare_data.shard_size=64 (repeatable)",
        )
        p.add_argument("--common-json", help="the common section as JSON (instead of --params)")
        p.add_argument("--config-json", help=f"the {spec.name} section as JSON")
        p.add_argument(
            "--pipeline-run-id", default=os.environ.get("LLM2CLIP_PIPELINE_RUN_ID", ""),
            help="id of the pipeline run this stage belongs to (MLflow lineage)",
        )
        if spec.fans_out:
            fan = p.add_mutually_exclusive_group()
            fan.add_argument("--part", metavar="G/N", type=_part,
                             help=f"run group task G of N (counted from 0) of a fan-out across machines: its share "
                                  f"of the work into --{spec.outputs[0]} (a part folder); then merge with --parts")
            fan.add_argument("--parts", nargs="+", metavar="DIR", default=(),
                             help=f"merge a fan-out: the N part folders that --part G/N wrote; writes "
                                  f"--{spec.outputs[0]} as one run would")
        if spec.per_eval_set:
            p.add_argument("--eval-set", metavar="NAME",
                           help="run on the evaluation set NAME of the eval_data section instead of the "
                                "pipeline's data (the sections are derived from it)")
        for name in spec.inputs:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, required=True,
                           metavar="DIR", help=f"input: {name} directory (local or s3://)")
        for name in spec.collected:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, default="", metavar="DIR",
                           help=f"input: folder with one {name} directory per evaluation set (optional)")
        for name in spec.outputs:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, required=True,
                           metavar="DIR", help=f"output: {name} directory (local or s3://)")
    _add_import_parser(sub, debug)
    return parser


# ------------------------------------------------------------------------------------ import
IMPORT = "import"
IMPORT_KINDS = ("openai-vit", "eva02", "caption-encoder")  # llm2clip.importers.KINDS (a test keeps them equal)


def _add_import_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    summary = "import a released LLM2CLIP checkpoint (a local snapshot of its Hugging Face repo)"
    p = sub.add_parser(IMPORT, help=summary, description=f"{summary}; docs/released-checkpoints.md",
                       parents=[debug])
    p.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(IMPORT_KINDS)}")
    p.add_argument("src", metavar="SRC", help="local directory: the snapshot of the released repo")
    p.add_argument("dst", metavar="DST", help="local directory to write (new or empty)")
    p.add_argument("--caption-encoder", metavar="DIR",
                   help="openai-vit/eva02: the imported caption-encoder dir the model pairs with "
                        "(its fingerprint is recorded, so evaluate checks the embeddings)")
    p.add_argument("--link", choices=("hardlink", "copy", "symlink"),
                   help="caption-encoder: how model files get into DST (default hardlink; a copy "
                        "across filesystems)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous import in DST")


def _import(args: argparse.Namespace) -> int:
    """Run the importer program (:mod:`llm2clip.importers.command`); errors propagate to :func:`main`.

    Run with ``runpy``, not imported: an import here would put the importers, and the vision and
    text packages behind them, into every stage's code closure (``tests/code_deps.py``, the
    ``dvc.yaml`` deps), although no stage runs them.
    """
    import runpy

    program = runpy.run_module("llm2clip.importers.command")
    result = program["run"](args.kind, args.src, args.dst, caption_encoder=args.caption_encoder,
                            link=args.link, overwrite=args.overwrite)
    log.info("import done: %s", json.dumps(result.summary(), default=str))
    return 0


def _json_flag(flag: str, text: str | None) -> dict:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag}: not valid JSON ({err})") from err


def _configs(args: argparse.Namespace):
    eval_set = getattr(args, "eval_set", None)
    if args.common_json is not None or args.config_json is not None:
        if args.params is not None or args.overrides or eval_set:
            raise ConfigError("use either --params/--set [--eval-set] or --common-json/--config-json")
        return load_sections(
            args.stage, _json_flag("--common-json", args.common_json), _json_flag("--config-json", args.config_json)
        )
    params = load_params(args.params, args.overrides)
    if eval_set:
        return params.eval_set(eval_set, args.stage)
    return params.section(args.stage), params.common


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _run(args: argparse.Namespace, context: ErrorContext) -> int:
    """Load the configs and run the stage; errors propagate to :func:`main`."""
    spec = STAGES[args.stage]
    cfg, common = _configs(args)
    context.endpoint = getattr(common, "s3_endpoint_url", "")
    paths: dict[str, Any] = {name: getattr(args, name) for name in spec.inputs + spec.outputs}
    for name in spec.collected:
        paths[name] = subdirectories(getattr(args, name), context.endpoint) if getattr(args, name) else []
    fan = {"part": getattr(args, "part", None), "parts": list(getattr(args, "parts", ()))}
    result = launch(spec.name, cfg, common, paths, args.pipeline_run_id, **fan)
    if result is not None:
        summary = result if isinstance(result, dict) else result.summary()
        log.info("%s done: %s", spec.name, json.dumps(summary, default=str))
    return 0


def _part(text: str) -> tuple[int, int]:
    """``--part G/N`` (argparse turns the ValueError into a usage error)."""
    from llm2clip.data.parts import parse_part

    try:
        return parse_part(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    """Run one stage (or ``import``).

    Exit codes: 0 success; 2 a user error (config, paths, credentials, endpoint, permissions,
    formats, a stage's own :class:`StageError`), logged as one ERROR line that says what to do;
    1 torchrun's workers failed; 130 interrupted. Anything else is a bug and keeps its traceback.
    ``--debug`` adds the traceback to the one line.
    """
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # torchrun workers run this CLI too
    context = ErrorContext(stage=args.stage)
    try:
        return _import(args) if args.stage == IMPORT else _run(args, context)
    except (Exception, KeyboardInterrupt) as err:
        explained = explain_error(err, context)
        if explained is None:
            raise
        message, code = explained
        log.error("%s", message, exc_info=err if args.debug else None)
        return code


if __name__ == "__main__":
    sys.exit(main())
