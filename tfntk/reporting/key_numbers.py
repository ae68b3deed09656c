"""The report's key numbers, each computed from tables with its definition in words."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pandas as pd

BARRIER_THRESHOLD = 0.01
VELOCITY_TOLERANCE = 0.2
EARLY_ONSET_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class KeyNumber:
    """One number of the report with the sentence that defines it."""

    name: str
    value: Optional[float]
    text: str
    definition: str


def first_spawn_below_barrier(barriers: Optional[pd.DataFrame], threshold: float = BARRIER_THRESHOLD) -> KeyNumber:
    """Finds the first spawn epoch whose mean test error barrier between children is below `threshold`."""
    definition = (
        f"The earliest spawn epoch at which the test error barrier between children (mean over child "
        f"pairs) is below {threshold:.0%}, and stays below it for every later spawn epoch measured."
    )
    if barriers is None:
        return KeyNumber("basin_fate_epoch", None, "Not measured.", definition)
    children = barriers[(barriers["pair"] == "children") & (barriers["split"] == "test")]
    by_spawn = children.groupby("spawn_epoch")["barrier"].mean().sort_index()
    below = by_spawn < threshold
    for epoch in by_spawn.index:
        if below.loc[epoch:].all():
            return KeyNumber("basin_fate_epoch", float(epoch), f"Children spawned at epoch {epoch:.3g} or later end in one basin (barrier below {threshold:.0%}).", definition)
    return KeyNumber("basin_fate_epoch", None, f"No spawn epoch measured has a barrier below {threshold:.0%} from then on.", definition)


def velocity_settling_epoch(velocity: Optional[pd.DataFrame], tolerance: float = VELOCITY_TOLERANCE) -> KeyNumber:
    """Finds the epoch after which parent 0's kernel velocity stays within `tolerance` of its final level."""
    definition = (
        f"The final level is the mean kernel velocity over the last three measured epochs of parent 0; "
        f"the number is the earliest epoch after which every measured velocity is within "
        f"{tolerance:.0%} of that level."
    )
    if velocity is None or velocity.empty:
        return KeyNumber("velocity_settling_epoch", None, "Not measured.", definition)
    runs = sorted(velocity["run"].unique())
    series = velocity[velocity["run"] == runs[0]].sort_values("epoch")
    values = series["velocity"].to_numpy()
    epochs = series["epoch"].to_numpy()
    final = float(np.mean(values[-3:]))
    within = np.abs(values - final) <= tolerance * abs(final)
    for index in range(len(values)):
        if within[index:].all():
            return KeyNumber("velocity_settling_epoch", float(epochs[index]),
                             f"Kernel velocity settles from epoch {epochs[index]:.3g} on (final level {final:.3g} per epoch).", definition)
    return KeyNumber("velocity_settling_epoch", None, "Kernel velocity did not settle.", definition)


def linearized_onset_ratio(linearized: Optional[pd.DataFrame], total_epochs: Optional[float]) -> KeyNumber:
    """Linearized test error at onset 0 divided by the best linearized test error of an early onset."""
    definition = (
        f"Test error of the order-1 linearized model trained from onset epoch 0 (the random kernel) "
        f"divided by the lowest test error among onsets after 0 and within the first "
        f"{EARLY_ONSET_FRACTION:.0%} of training (a data-dependent kernel); errors at the best stopping epoch."
    )
    if linearized is None or total_epochs is None:
        return KeyNumber("linearized_onset_ratio", None, "Not measured.", definition)
    rows = linearized[(linearized["kind"] == "linearized_order_1") & (linearized["split"] == "test")]
    at_zero = rows[rows["onset_epoch"] == 0.0]["error"]
    early = rows[(rows["onset_epoch"] > 0.0) & (rows["onset_epoch"] <= EARLY_ONSET_FRACTION * total_epochs)]
    if at_zero.empty or early.empty:
        return KeyNumber("linearized_onset_ratio", None, "Needs onset 0 and an early onset.", definition)
    best = early.loc[early["error"].idxmin()]
    ratio = float(at_zero.iloc[0]) / max(float(best["error"]), 1e-12)
    error_zero = float(at_zero.iloc[0])
    error_best = float(best["error"])
    if ratio >= 1.0:
        text = (f"Linearizing at epoch {best['onset_epoch']:.3g} instead of 0 divides the test error by {ratio:.2f} "
                f"({error_zero:.3f} to {error_best:.3f}).")
    else:
        text = (f"No early onset beats onset 0: the best, epoch {best['onset_epoch']:.3g}, has test error "
                f"{error_best:.3f} against {error_zero:.3f} at onset 0 (ratio {ratio:.2f}).")
    return KeyNumber("linearized_onset_ratio", ratio, text, definition)
