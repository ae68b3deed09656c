r"""Redraw every figure of a run from its tables and write `report.html`.

    python -m tfntk.report RUN_DIR

No model is rebuilt and nothing is differentiated, so a copied run directory (tables and
config only) is enough.
"""

from __future__ import annotations

import sys

from absl import app, logging


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        print("error: usage: python -m tfntk.report RUN_DIR", file=sys.stderr)
        sys.exit(2)
    from tfntk import storage  # pylint: disable=import-outside-toplevel
    from tfntk.reporting import figures, html  # pylint: disable=import-outside-toplevel

    run_dir = argv[1]
    if not storage.exists(storage.RunDir(run_dir).table("learning_curves")):
        print(f"error: {run_dir} has no tables/learning_curves.csv; pass a run directory written by tfntk.run.",
              file=sys.stderr)
        sys.exit(2)
    drawn = figures.draw_all(run_dir)
    path = html.write_report(run_dir)
    logging.info("Drew %d figures (%s) and wrote %s", len(drawn), ", ".join(drawn), path)


if __name__ == "__main__":
    app.run(main)
