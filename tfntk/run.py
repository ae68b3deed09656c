r"""Command line: parse gin files and bindings, then run the main job in a run directory.

    python -m tfntk.run --gin_file gin/digits_quick.gin \
        [--gin_file more.gin ...] [--gin_param 'TrainingConfig.epochs = 4' ...] [--run_dir DIR]

Rerunning the same command on an existing run directory resumes it. Exit status 0 means success
and 2 an invalid configuration, rejected before any training. Exit status 1 means a run failed;
the message names the value and the fix, and snapshots already stored are kept.
"""

from __future__ import annotations

import logging as python_logging
import os
import shlex
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file; repeat to layer several, later ones win.")
flags.DEFINE_multi_string("gin_param", [], "Gin binding such as 'TrainingConfig.epochs = 4'; applied after the files.")
flags.DEFINE_string(
    "run_dir", None, "Run directory; default runs/<name of the last --gin_file>. An existing one is resumed."
)

EXIT_INVALID_CONFIG = 2
EXIT_RUN_FAILED = 1


def default_run_dir(gin_files: list[str]) -> str:
    stem = os.path.splitext(os.path.basename(gin_files[-1]))[0]
    return os.path.join("runs", stem)


class _DropLibraryInfo(python_logging.Filter):
    """Drops INFO lines that TensorFlow and Keras log through absl (checkpoint sharding,
    SavedModel writing), which would bury the progress lines."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.levelno >= python_logging.WARNING:
            return True
        return not any(part in record.pathname for part in ("/tensorflow/", "/keras/", "/tf_keras/"))


def _fail(code: int, message: str) -> None:
    """Prints one `error: ...` line (without gin's call-site suffix) and exits with `code`."""
    message = " ".join(message.split(" In call to configurable")[0].split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str]) -> None:
    if not FLAGS.gin_file:
        _fail(EXIT_INVALID_CONFIG, "Missing --gin_file; pass a preset such as --gin_file gin/digits_quick.gin.")
    if len(argv) > 1:
        _fail(EXIT_INVALID_CONFIG, f"Unexpected arguments {argv[1:]}; use --gin_file, --gin_param and --run_dir.")

    python_logging.getLogger("tensorflow").setLevel(python_logging.WARNING)
    python_logging.getLogger("absl").addFilter(_DropLibraryInfo())

    from tfntk import config  # pylint: disable=import-outside-toplevel
    from tfntk.experiments import main_job  # pylint: disable=import-outside-toplevel

    try:
        config.parse(FLAGS.gin_file, FLAGS.gin_param)
    except config.ConfigError as error:
        _fail(EXIT_INVALID_CONFIG, str(error))

    run_dir = FLAGS.run_dir or default_run_dir(FLAGS.gin_file)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tfntk.run"] + sys.argv[1:])
    try:
        main_job.main_job(run_dir=run_dir, command=command)
    except main_job.InvalidSettingError as error:
        _fail(EXIT_INVALID_CONFIG, str(error))
    except main_job.RUN_ERRORS as error:
        _fail(EXIT_RUN_FAILED, " ".join(str(error).split()))


if __name__ == "__main__":
    app.run(main)
