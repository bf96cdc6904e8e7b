"""`dheads <job> [key=value ...]`: compose the job's config, then run the job.

Jobs are discovered, not imported by name: each is an entry point of the
group `dheads.jobs` (see pyproject.toml) naming a `run(cfg)` that takes the
job's typed config. The platform layer therefore never names the jobs/ or
serve/ packages that sit above it.

Errors a user can fix (a typo, a wrong type, a missing file or checkpoint, an
unreachable S3 endpoint) print one line on stderr and exit with status 2;
`--debug` (or HYDRA_FULL_ERROR=1) shows the traceback instead.
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

from dheads.platform.config import ConfigError, compose

ENTRY_POINT_GROUP = "dheads.jobs"
EXIT_USAGE = 2


def jobs() -> dict:
    """Job name -> entry point, from the installed distributions."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def usage(names) -> str:
    return f"""usage: dheads <job> [key=value ...] [--cfg] [--debug]
       dheads submit <job> [key=value ...]   send the job to cluster.dashboard_address
       dheads submit status|logs|stop JOB_ID
  --cfg     print the composed config and exit
  --debug   show the full traceback of an error (also: HYDRA_FULL_ERROR=1)
jobs: {', '.join(sorted(names))}"""


def user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error behind `exc` (through `__cause__` and Ray's
    task-error wrappers), or None for anything else (a bug: traceback)."""
    from dheads.model.checkpoint import CheckpointError
    from dheads.platform.errors import UserError
    from dheads.platform.media import MediaError
    from dheads.platform.storage import StorageError

    fixable = (ConfigError, UserError, CheckpointError, StorageError, MediaError,
               FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, fixable):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = jobs()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(known))
        return 0
    job, rest = argv[0], argv[1:]
    debug = "--debug" in rest or os.environ.get("HYDRA_FULL_ERROR") == "1"
    rest = [a for a in rest if a != "--debug"]
    if job == "submit":
        from dheads.platform.submit import main as submit_main

        return submit_main(rest)
    if job not in known:
        print(f"dheads: unknown job {job!r}; jobs: {', '.join(sorted(known))} "
              f"(dheads --help)", file=sys.stderr)
        return EXIT_USAGE
    show_cfg = "--cfg" in rest
    overrides = [a for a in rest if a != "--cfg"]
    try:
        target = known[job].load()
        cfg = compose(job, overrides)
        if show_cfg:
            from dheads.platform.config import to_yaml

            print(to_yaml(cfg))
            return 0
        result = target(cfg)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        fixable = user_error(e)
        if debug or fixable is None:
            raise
        print(f"dheads {job}: {one_line(fixable)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE
    return _exit_code(result)


def _exit_code(result) -> int:
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
