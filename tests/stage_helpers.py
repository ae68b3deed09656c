"""Helpers shared by the measurement-stage tests."""

import dataclasses
import os
import shutil

from tfntk import storage


def read_table(job, name):
    """Reads the run's table `name` as a DataFrame."""
    return storage.read_csv(job.run.table(name))


def copy_run(job, root, parents_only=False):
    """Returns the same job in a copy of its run directory at `root`.

    With `parents_only`, only `parents/` is copied. The copy reads its own checkpoints.
    """
    if parents_only:
        shutil.copytree(os.path.join(job.run.root, "parents"), os.path.join(root, "parents"))
    else:
        shutil.copytree(job.run.root, root)
    return dataclasses.replace(job, run=storage.RunDir(str(root)))
