"""
C{python -m streamrelay check FILE [--dump]}: the route file checked as
C{twistd streamrelay --check} checks it, for hosts and scripts without twistd
at hand (a CI job, a configuration management hook).
"""

from __future__ import annotations

import argparse

from .dump import report
from .tap import load_routes


def main(argv: list[str] | None = None) -> None:
    """Exit 0 when the file is valid, 1 with the start's message when not, 2 on a usage error."""
    parser = argparse.ArgumentParser(prog="python -m streamrelay", description="streamrelay's command line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check", help="validate a route file without binding anything",
        description="Validate a route file without binding anything and print one line per route.",
    )
    check.add_argument("file", metavar="FILE", help="the YAML route file")
    check.add_argument(
        "--dump", action="store_true", help="print the effective configuration (defaults filled in) as YAML instead",
    )
    options = parser.parse_args(argv)
    print(report(load_routes(options.file), as_yaml=options.dump), end="")


if __name__ == "__main__":
    main()
