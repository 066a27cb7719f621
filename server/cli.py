"""Command line: argv -> Settings -> app.run()."""

from __future__ import annotations

import sys

from server import app, settings


def main(argv: list[str] | None = None) -> int:
    return app.run(settings.from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
