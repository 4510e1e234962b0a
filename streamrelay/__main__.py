"""
C{python -m streamrelay check FILE [--dump]}: the route file checked as
C{twistd streamrelay --check} checks it, for hosts and scripts without twistd
at hand (a CI job, a configuration management hook).

C{python -m streamrelay gateway-encrypt --secret-file F HOST:PORT}: the line a
gateway route's client sends, for operators to hand out.
"""

from __future__ import annotations

import argparse
import sys

from .dump import report
from .gateway import GatewayConfig, encrypt, parse_target
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
    encrypting = commands.add_parser(
        "gateway-encrypt", help="encrypt a target for a gateway route's clients",
        description="Print the line (base64, on one line) that names TARGET to a gateway route with this secret.",
    )
    encrypting.add_argument("target", metavar="TARGET", help="IPv4:PORT or [IPv6]:PORT")
    encrypting.add_argument("--secret-file", required=True, help="the file holding the secret (one trailing newline is ignored)")
    encrypting.add_argument("--format", choices=("openssl", "sealed"), default="openssl")
    encrypting.add_argument("--kdf", choices=("sha256", "md5", "pbkdf2"), default="sha256")
    encrypting.add_argument("--iterations", type=int, default=10000, help="for --kdf pbkdf2 and --format sealed")
    options = parser.parse_args(argv)
    if options.command == "check":
        print(report(load_routes(options.file), as_yaml=options.dump), end="")
        return
    if parse_target(options.target.encode()) is None:
        parser.error(f"TARGET: expected IPv4:PORT or [IPv6]:PORT, found {options.target!r}")
    try:
        with open(options.secret_file, "rb") as f:
            secret = f.read().removesuffix(b"\n").removesuffix(b"\r")
    except OSError as e:
        sys.exit(f"cannot read the secret: {e}")
    if not secret:
        sys.exit(f"{options.secret_file}: the secret is empty")
    settings = GatewayConfig(
        secret=secret, allow_targets=(), format=options.format, kdf=options.kdf, iterations=options.iterations,
    )
    print(encrypt(options.target.encode(), settings).decode())


if __name__ == "__main__":
    main()
