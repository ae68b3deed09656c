"""`report.html`: every figure with its caption, the key numbers with definitions, the config."""

from __future__ import annotations

import datetime
import html

import tensorflow as tf

from tfntk import storage
from tfntk.reporting import figures, key_numbers

# Caption of each figure, keyed by name or by name prefix (for one figure per spawn epoch).
CAPTIONS = {
    "integrated": (
        "An integrated view of learning. (A) Test (solid) and train (dotted) error of the two "
        "independent parents. (B) Error barrier between two children at the end of training against "
        "the epoch at which they were spawned from parent 0: the extra error on the straight line "
        "between their weights. (C, D) ReLU activation distance and kernel distance between parent 0's "
        "snapshots at every pair of epochs. (E) ReLU, function-space and kernel distance between the "
        "children at the end, against spawn epoch; dotted lines are the two independent parents. The "
        "function-space distance is the fraction of test inputs on which the two networks' labels differ, "
        "divided by that of independent classifiers with the same error rates (1 = independent errors). "
        "Dashed black lines are learning-rate drops."
    ),
    "basin_fate": (
        "Basin fate. Parent learning curves; error barrier between children against spawn epoch (test "
        "and train); function-space distance (disagreement normalised by that of independent "
        "classifiers with the same error rates, so 1 means independent errors) and L2 weight distance "
        "between children, with the independent parents as dotted lines."
    ),
    "appendix": (
        "Appendix panels. Top eigenvalue of the training-loss Hessian over parent 0's training against "
        "2 / learning rate (above the line, gradient descent escapes a quadratic basin); alignment of "
        "the logit gradient centroids between children (mean cosine similarity over classes, 1 = same "
        "orientation); L2 weight distance between children."
    ),
    "kernel_heatmaps": (
        "Kernel distance (1 - normalised Frobenius inner product of two empirical NTK Gram matrices), "
        "ReLU activation distance (fraction of ReLU units whose on/off state differs) and logit "
        "gradient centroid alignment between parent 0's snapshots at every pair of epochs, on the "
        "fixed analysis subset. Dashed lines are learning-rate drops."
    ),
    "kernel_velocity": (
        "Kernel velocity: kernel distance between snapshots 0.4 epochs apart divided by their "
        "separation in epochs. A velocity that is high early and later settles means the kernel "
        "learns fast before basin fate is sealed; the key numbers say whether this run settled."
    ),
    "barrier_vs_velocity": (
        "Error barrier between children against parent 0's kernel velocity at their spawn epoch, one "
        "point per spawn epoch."
    ),
    "children_kernel": (
        "Kernel distance, ReLU activation distance and centroid alignment between the children at the "
        "end of training against spawn epoch; the dotted line is the two independent parents."
    ),
    "curvature": (
        "Local curvature. Left: top eigenvalue(s) of the training-loss Hessian at parent 0's snapshots "
        "with 2 / learning rate. Right: escape threshold over minibatches (positive means an SGD step "
        "leaves the local quadratic basin) and its gradient-descent form."
    ),
    "linearized": (
        "Linearized training. Test and train error against the onset epoch at which training switches "
        "from the network to its order-1 Taylor expansion (the data-dependent NTK learned until then), "
        "at the best stopping epoch; the network at the same onset trained on at a low learning rate; "
        "the parent's error at the onset and at the end."
    ),
    "nonlinear_advantage": (
        "Nonlinear advantage: linearized error minus low-learning-rate nonlinear error from the same "
        "onset, against the error barrier between children spawned at that epoch and against onset epoch."
    ),
    "children_over_time": (
        "Function-space distance and error barrier between the two children of each spawn epoch while "
        "they train, every third of an epoch (thin: raw; thick: moving average)."
    ),
    "final_child_distance": (
        "Function-space distance between children at the end of training against spawn epoch (error "
        "bars: spread over their last snapshots) and against error barrier; the band is the two "
        "independent parents."
    ),
    "tsne": (
        "t-SNE of the test-set class probabilities of parents and children over training in one common "
        "embedding; each panel highlights one run (colour: epoch)."
    ),
    "sections": (
        "A 2D section of weight space through parent 0 at the spawn epoch and the two children spawned "
        "there: test error, function-space distance to child 0, and the test error of the order-1 "
        "Taylor model linearized at the parent and at child 0 on the same plane, with the runs' paths "
        "projected onto it. The spawn epoch is in the figure's title and name."
    ),
}


def caption(name: str) -> str:
    if name in CAPTIONS:
        return CAPTIONS[name]
    for prefix, text in CAPTIONS.items():
        if name.startswith(prefix + "_"):
            return text
    return ""


def _figure_names(run_dir: str) -> list[str]:
    directory = storage.join(run_dir, "figures")
    if not storage.exists(directory):
        return []
    names = sorted(f[:-4] for f in tf.io.gfile.listdir(directory) if f.endswith(".png"))
    order = ["integrated", "basin_fate", "kernel_heatmaps", "kernel_velocity", "barrier_vs_velocity",
             "children_kernel", "linearized", "nonlinear_advantage", "curvature", "appendix",
             "children_over_time", "final_child_distance", "tsne"]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def compute_key_numbers(run_dir: str) -> list[key_numbers.KeyNumber]:
    curves = figures.read_table(run_dir, "learning_curves")
    total_epochs = float(curves["epoch"].max()) if curves is not None else None
    return [
        key_numbers.first_spawn_below_barrier(figures.read_table(run_dir, "error_barrier")),
        key_numbers.velocity_settling_epoch(figures.read_table(run_dir, "kernel_velocity")),
        key_numbers.linearized_onset_ratio(figures.read_table(run_dir, "linearized"), total_epochs),
    ]


def write_report(run_dir: str) -> str:
    """Writes `report.html` beside the figures; returns its path."""
    run = storage.RunDir(run_dir)
    config = storage.read_text(run.config_gin) if storage.exists(run.config_gin) else "(config.gin not found)"
    command = storage.read_text(run.command_txt) if storage.exists(run.command_txt) else ""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tfntk report</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em;}"
        "img{max-width:100%;border:1px solid #ddd;}figure{margin:2em 0;}figcaption{color:#333;max-width:70em;}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;}dt{font-weight:bold;margin-top:.6em;}</style>",
        "</head><body>",
        f"<h1>tfntk report: {html.escape(run_dir)}</h1>",
        f"<p>Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} from the run's tables.</p>",
        "<h2>Key numbers</h2><dl>",
    ]
    for number in compute_key_numbers(run_dir):
        parts.append(f"<dt>{html.escape(number.text)}</dt><dd>{html.escape(number.definition)}</dd>")
    parts.append("</dl><h2>Figures</h2>")
    for name in _figure_names(run_dir):
        parts.append(
            f"<figure><img src='figures/{html.escape(name)}.png' alt='{html.escape(name)}'>"
            f"<figcaption><b>{html.escape(name)}</b>. {html.escape(caption(name))} "
            f"(<a href='figures/{html.escape(name)}.pdf'>PDF</a>)</figcaption></figure>"
        )
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<p>Command: <code>{html.escape(command.strip())}</code></p>")
    parts.append(f"<pre>{html.escape(config)}</pre></body></html>")
    storage.write_text_atomic(run.report_html, "\n".join(parts))
    return run.report_html
