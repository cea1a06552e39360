"""``pacs-triage`` command line: ``serve`` runs the HTTP service under uvicorn, ``version`` prints it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.config:
        os.environ["PACS_TRIAGE_CONFIG"] = args.config
    from service.app import create_app
    from service.config import Settings
    from service.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    host = args.host or settings.api.host
    port = args.port if args.port is not None else settings.api.port
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    return 0


def _version(_args: argparse.Namespace) -> int:
    from service.app import __version__

    sys.stdout.write(f"pacs-triage {__version__}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacs-triage", description="AI triage beside a PACS")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (default: api.host setting)")
    serve.add_argument("--port", type=int, help="TCP port (default: api.port setting)")
    serve.add_argument("--config", help="YAML settings file (same as PACS_TRIAGE_CONFIG)")
    serve.set_defaults(func=_serve)
    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=_version)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
