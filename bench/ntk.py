"""Benchmarks tfntk's empirical NTK against neural-tangents on the same models and weights.

For each model, every tfntk implementation computes the full kernel K(x, x) of shape
(n, n, K, K). So does neural-tangents 0.6.5's `empirical_ntk_fn` with each of its three
implementations (Jacobian contraction, NTK-vector products, structured derivatives), on the same
inputs and weights. Each case runs in a fresh subprocess, so its peak resident memory
(`ru_maxrss`) is its own. Reported: inputs per second (n divided by the seconds of one kernel
computation after tracing or compilation) and peak memory. Also reported: the largest difference
to the tfntk "jacobian" kernel relative to its largest entry, and the same against a float64
reference, the float64 contraction of per-example Jacobians that a plain `tf.GradientTape` computes,
independent of both libraries' contractions. The reference covers inputs 0 and 1 and the
`--reference_inputs` inputs whose kernel rows differ most between the libraries.

The neural-tangents side runs in `bench/.venv-nt` (create it with
`bash bench/setup_neural_tangents.sh`) with the architectures written in JAX below, and receives
the Keras weights through an .npz file.

A memory sweep then runs the faster tfntk implementation for growing n and checks that the
peak memory stays under `--memory_budget_gib`: the Jacobian panel is sized from the budget minus
the memory measured before the kernel computation and twice the kernel's own size.

Usage:
  python bench/ntk.py --results=bench/RESULTS.md
  python bench/ntk.py --models=simple_cnn_digits --n=64 --memory_sweep=   # a quick run
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

# Lets `python bench/ntk.py` import tfntk from this checkout without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A sibling module of this script.
from results_file import cpu_description, write_section  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models", ["simple_cnn_digits", "simple_cnn_cifar", "resnet20_cifar"],
    "Cases to run: simple_cnn_digits (8x8x1), simple_cnn_cifar (32x32x3), resnet20_cifar "
    "(32x32x3, ResNet-20 without batch norm).",
)
flags.DEFINE_integer("n", 256, "Inputs per kernel side (n1 = n2 = n).")
flags.DEFINE_integer("slow_n", 32, "Inputs per side for the NTK-vector-product cases of both libraries.")
flags.DEFINE_integer("num_classes", 10, "Logits K.")
flags.DEFINE_integer(
    "reference_inputs", 4,
    "The float64 reference covers inputs 0 and 1 and this many inputs where the kernels differ most.",
)
flags.DEFINE_list("tfntk_implementations", ["jacobian", "ntvp"], "tfntk implementations to run.")
flags.DEFINE_list(
    "nt_implementations", ["jacobian_contraction", "ntk_vector_products", "structured_derivatives"],
    "neural-tangents implementations to run; empty to skip neural-tangents.",
)
flags.DEFINE_integer("batch_size", 16, "tfntk inputs per block.")
flags.DEFINE_float("jacobian_memory_gib", 8.0, "tfntk jacobian_memory_gib of the timed cases.")
flags.DEFINE_integer(
    "nt_fallback_batch_size", 64,
    "When neural-tangents runs out of memory on the whole kernel, it is rerun through nt.batch "
    "with this many inputs per block.",
)
flags.DEFINE_list("memory_sweep", ["256", "512", "1024", "2048"], "n of the memory sweep; empty to skip.")
flags.DEFINE_string("sweep_model", "simple_cnn_digits", "Case of the memory sweep.")
flags.DEFINE_bool("sweep_trace_logits", True, "Logit-traced (n, n) kernels in the memory sweep.")
flags.DEFINE_float("memory_budget_gib", 2.0, "Peak resident memory allowed in the memory sweep, in GiB.")
flags.DEFINE_string("nt_python", "bench/.venv-nt/bin/python", "Interpreter of the neural-tangents venv.")
flags.DEFINE_string("out_dir", "bench/out/ntk", "Where inputs, weights and kernels are exchanged.")
flags.DEFINE_integer("timeout_s", 1800, "Limit for one case's subprocess, in seconds.")
flags.DEFINE_string("results", None, "Markdown file to append or update the section in.")
flags.DEFINE_string("worker", "", "Internal: 'tfntk' or 'nt' runs one case described by --case.")
flags.DEFINE_string("case", "", "Internal: JSON description of one case.")

SECTION = "## Empirical NTK (bench/ntk.py)"
CASES = {
    "simple_cnn_digits": {"builder": "simple_cnn", "input_shape": (8, 8, 1), "kwargs": {}},
    "simple_cnn_cifar": {"builder": "simple_cnn", "input_shape": (32, 32, 3), "kwargs": {}},
    "resnet20_cifar": {"builder": "resnet20", "input_shape": (32, 32, 3), "kwargs": {"batch_norm": False}},
}
NT_IMPLEMENTATIONS = {"jacobian_contraction": 1, "ntk_vector_products": 2, "structured_derivatives": 3}
SLOW_IMPLEMENTATIONS = ("ntvp", "ntk_vector_products")


def peak_rss_gib() -> float:
    """Returns this process's peak resident memory in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


# ----------------------------------------------------------------------------------------------
# tfntk worker (system interpreter).


def run_tfntk_case(case: dict) -> dict:
    """Times one tfntk kernel computation and saves the kernel to case['kernel_path']."""
    import tensorflow as tf

    from tfntk.autodiff import ntk

    model = load_keras_model(case)
    x = np.load(case["inputs_path"])["x"][: case["n"]]
    trace_logits = case.get("trace_logits", False)
    batch_size = case["batch_size"]

    def kernel(inputs, memory_gib):
        return ntk.empirical_ntk(
            model, inputs, trace_logits=trace_logits, implementation=case["implementation"],
            batch_size=batch_size, jacobian_memory_gib=memory_gib,
        )

    kernel(x[: min(len(x), 2 * batch_size)], 1.0).numpy()
    memory_gib = case["jacobian_memory_gib"]
    if case.get("memory_budget_gib"):
        output_gib = 4 * len(x) ** 2 * (1 if trace_logits else case["num_classes"] ** 2) / 2**30
        memory_gib = max(1e-3, case["memory_budget_gib"] - current_rss_gib() - 2 * output_gib - 0.5)

    start = time.perf_counter()
    result = kernel(tf.constant(x), memory_gib).numpy()
    seconds = time.perf_counter() - start
    if case.get("kernel_path"):
        np.save(case["kernel_path"], result)
    return {"seconds": seconds, "peak_gib": peak_rss_gib(), "jacobian_memory_gib": memory_gib}


def run_reference_case(case: dict) -> dict:
    """Saves J(x) J(x)^T in float64 for the inputs case['indices'], from a plain GradientTape."""
    import tensorflow as tf

    from tfntk.autodiff import functional

    model = load_keras_model(case)
    x = tf.constant(np.load(case["inputs_path"])["x"][case["indices"]])
    weights = functional.current_weights(model)
    with tf.GradientTape() as tape:
        tape.watch(weights.trainable)
        logits = functional.logits_at(model, weights, x)
    parts = tape.jacobian(logits, weights.trainable)
    count = len(case["indices"])
    jacobian = np.concatenate([np.reshape(p.numpy(), (count, case["num_classes"], -1)) for p in parts], axis=2)
    jacobian = jacobian.astype(np.float64)
    np.save(case["kernel_path"], np.einsum("ikd,jld->ijkl", jacobian, jacobian))
    return {"peak_gib": peak_rss_gib()}


def load_keras_model(case: dict):
    from tfntk import models

    spec = CASES[case["model"]]
    model = models.build_model(spec["builder"], spec["input_shape"], case["num_classes"], seed=0, **spec["kwargs"])
    weights = np.load(case["weights_path"])
    for variable in model.variables:
        variable.assign(weights[variable.path])
    return model


# ----------------------------------------------------------------------------------------------
# neural-tangents worker (bench/.venv-nt interpreter): no TensorFlow or tfntk imports.


def jax_simple_cnn(weights: dict):
    """SimpleCNN in JAX: six 3x3 'SAME' convolutions with bias, 2x2 max-pools after every
    second one, global average pooling, dense logits; parameters from Keras variable paths."""
    from jax import lax
    import jax.numpy as jnp

    params = {
        "convs": [(weights[f"conv{i}/kernel"], weights[f"conv{i}/bias"]) for i in range(1, 7)],
        "logits": (weights["logits/kernel"], weights["logits/bias"]),
    }

    def apply(params, x):
        for i, (kernel, bias) in enumerate(params["convs"], start=1):
            x = jnp.maximum(_jax_conv(x, kernel, 1) + bias, 0.0)
            if i % 2 == 0:
                x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        x = jnp.mean(x, axis=(1, 2))
        return x @ params["logits"][0] + params["logits"][1]

    return apply, params


def jax_resnet20(weights: dict):
    """ResNet-20 v1 without batch norm in JAX, with strided 1x1 projection shortcuts, matching
    `tfntk.models.resnet20(batch_norm=False)`."""
    import jax.numpy as jnp

    def conv_params(name):
        return (weights[f"{name}/kernel"], weights[f"{name}/bias"])

    blocks = []
    for stage in (1, 2, 3):
        for block in (1, 2, 3):
            name = f"stage{stage}_block{block}"
            shortcut = conv_params(f"{name}_shortcut_conv") if f"{name}_shortcut_conv/kernel" in weights else None
            blocks.append({"conv1": conv_params(f"{name}_conv1"), "conv2": conv_params(f"{name}_conv2"), "shortcut": shortcut})
    params = {"stem": conv_params("stem_conv"), "blocks": blocks, "logits": conv_params("logits")}
    strides = [2 if stage > 1 and block == 1 else 1 for stage in (1, 2, 3) for block in (1, 2, 3)]

    def apply(params, x):
        x = jnp.maximum(_jax_conv(x, params["stem"][0], 1) + params["stem"][1], 0.0)
        for block, stride in zip(params["blocks"], strides):
            shortcut = x
            if block["shortcut"] is not None:
                shortcut = _jax_conv(x, block["shortcut"][0], stride) + block["shortcut"][1]
            y = jnp.maximum(_jax_conv(x, block["conv1"][0], stride) + block["conv1"][1], 0.0)
            y = _jax_conv(y, block["conv2"][0], 1) + block["conv2"][1]
            x = jnp.maximum(shortcut + y, 0.0)
        x = jnp.mean(x, axis=(1, 2))
        return x @ params["logits"][0] + params["logits"][1]

    return apply, params


def _jax_conv(x, kernel, stride):
    from jax import lax

    return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def run_nt_case(case: dict) -> dict:
    """Times one neural-tangents kernel computation after compiling it on the same shapes."""
    import jax
    import neural_tangents as nt

    weights = dict(np.load(case["weights_path"]))
    builder = jax_resnet20 if CASES[case["model"]]["builder"] == "resnet20" else jax_simple_cnn
    apply, params = builder(weights)
    x = np.load(case["inputs_path"])["x"][: case["n"]]

    kernel_fn = jax.jit(
        nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0, implementation=NT_IMPLEMENTATIONS[case["implementation"]])
    )
    if case.get("nt_batch_size"):
        kernel_fn = nt.batch(kernel_fn, batch_size=case["nt_batch_size"], store_on_device=False)

    start = time.perf_counter()
    np.asarray(kernel_fn(x, None, params))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    result = np.asarray(kernel_fn(x, None, params))
    seconds = time.perf_counter() - start
    if case.get("kernel_path"):
        np.save(case["kernel_path"], result)
    return {"seconds": seconds, "first_call_seconds": compile_and_run, "peak_gib": peak_rss_gib()}


# ----------------------------------------------------------------------------------------------
# Orchestration (system interpreter).


def prepare_case_files(model_name: str, n: int) -> dict:
    """Writes the inputs and the seed-0 weights of one model and returns their paths."""
    from tfntk import models

    spec = CASES[model_name]
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    inputs_path = os.path.join(FLAGS.out_dir, f"{model_name}_inputs.npz")
    weights_path = os.path.join(FLAGS.out_dir, f"{model_name}_weights.npz")
    rng = np.random.default_rng(0)
    np.savez(inputs_path, x=rng.normal(size=(n,) + spec["input_shape"]).astype(np.float32))
    model = models.build_model(spec["builder"], spec["input_shape"], FLAGS.num_classes, seed=0, **spec["kwargs"])
    np.savez(weights_path, **{v.path: v.numpy() for v in model.variables})
    return {
        "inputs_path": inputs_path,
        "weights_path": weights_path,
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    }


def run_case(worker: str, case: dict) -> dict:
    """Runs one case in a fresh subprocess and returns its JSON result (or an 'error' entry)."""
    python = FLAGS.nt_python if worker == "nt" else sys.executable
    command = [python, os.path.abspath(__file__), f"--worker={worker}", f"--case={json.dumps(case)}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=FLAGS.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {FLAGS.timeout_s} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        out_of_memory = "RESOURCE_EXHAUSTED" in completed.stderr or completed.returncode in (-9, 137)
        return {"error": "out of memory" if out_of_memory else tail[0][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def relative_difference(kernel: np.ndarray, reference: np.ndarray) -> float:
    """Returns max |K - R| / max |R| over the leading inputs that both kernels cover."""
    shared = tuple(slice(0, min(a, b)) for a, b in zip(kernel.shape, reference.shape))
    return float(np.max(np.abs(kernel[shared] - reference[shared])) / np.max(np.abs(reference[shared])))


def float64_error(kernel: np.ndarray, reference: np.ndarray, indices: list[int]) -> float:
    """Returns max |K - R| / max |R| on the reference inputs that the kernel covers."""
    covered = [position for position, index in enumerate(indices) if index < kernel.shape[0]]
    rows = [indices[position] for position in covered]
    return relative_difference(kernel[np.ix_(rows, rows)], reference[np.ix_(covered, covered)])


def disagreement_inputs(kernels: list[np.ndarray], reference: np.ndarray, count: int) -> list[int]:
    """Returns the inputs 0 and 1 and the `count` inputs whose kernel rows differ most from
    `reference` in any of `kernels`, sorted."""
    worst = np.zeros(reference.shape[0])
    for kernel in kernels:
        rows = min(kernel.shape[0], reference.shape[0])
        difference = np.abs(kernel[:rows, :rows] - reference[:rows, :rows]).reshape(rows, -1).max(axis=1)
        worst[:rows] = np.maximum(worst[:rows], difference)
    return sorted({0, 1} | set(np.argsort(worst)[::-1][:count].tolist()))


def benchmark_model(model_name: str) -> list[dict]:
    """Runs every case of one model, then compares the kernels with each other and with float64."""
    files = prepare_case_files(model_name, max(FLAGS.n, FLAGS.slow_n))
    base = {"model": model_name, "num_classes": FLAGS.num_classes, **files}
    runs = [("tfntk", name) for name in FLAGS.tfntk_implementations]
    runs += [("nt", name) for name in FLAGS.nt_implementations]
    rows, kernels = [], {}
    for worker, implementation in runs:
        n = FLAGS.slow_n if implementation in SLOW_IMPLEMENTATIONS else FLAGS.n
        kernel_path = os.path.join(FLAGS.out_dir, f"{model_name}_{worker}_{implementation}_kernel.npy")
        if os.path.exists(kernel_path):
            os.remove(kernel_path)
        case = dict(base, n=n, implementation=implementation, kernel_path=kernel_path,
                    batch_size=FLAGS.batch_size, jacobian_memory_gib=FLAGS.jacobian_memory_gib)
        result = run_case(worker, case)
        if worker == "nt" and result.get("error") == "out of memory" and FLAGS.nt_fallback_batch_size:
            case["nt_batch_size"] = FLAGS.nt_fallback_batch_size
            result = run_case(worker, case)
            result["note"] = f"nt.batch({FLAGS.nt_fallback_batch_size}) after running out of memory unbatched"
        if os.path.exists(kernel_path):
            kernels[len(rows)] = np.load(kernel_path).astype(np.float64)
        rows.append({"model": model_name, "parameters": files["parameters"], "library": worker,
                     "implementation": implementation, "n": n, **result})
        print(json.dumps(rows[-1]), flush=True)

    tfntk_index = next((i for i, row in enumerate(rows) if row["library"] == "tfntk" and row["implementation"] == "jacobian"), None)
    if tfntk_index is None or tfntk_index not in kernels:
        return rows
    reference = kernels[tfntk_index]
    indices = disagreement_inputs(list(kernels.values()), reference, FLAGS.reference_inputs)
    reference_path = os.path.join(FLAGS.out_dir, f"{model_name}_float64_reference.npy")
    run_case("reference", dict(base, indices=indices, kernel_path=reference_path))
    exact = np.load(reference_path) if os.path.exists(reference_path) else None
    for i, row in enumerate(rows):
        row["reference_inputs"] = indices
        if i in kernels:
            row["difference"] = relative_difference(kernels[i], reference)
            row["float64_error"] = None if exact is None else float64_error(kernels[i], exact, indices)
    return rows


def memory_sweep() -> list[dict]:
    sizes = [int(n) for n in FLAGS.memory_sweep]
    files = prepare_case_files(FLAGS.sweep_model, max(sizes))
    rows = []
    for n in sizes:
        case = {"model": FLAGS.sweep_model, "num_classes": FLAGS.num_classes, **files, "n": n,
                "implementation": "jacobian", "batch_size": FLAGS.batch_size,
                "jacobian_memory_gib": FLAGS.jacobian_memory_gib, "trace_logits": FLAGS.sweep_trace_logits,
                "memory_budget_gib": FLAGS.memory_budget_gib}
        result = run_case("tfntk", case)
        rows.append({"n": n, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def format_section(rows: list[dict], sweep: list[dict], seconds: float) -> str:
    import keras
    import tensorflow as tf

    nt_versions = "neural-tangents 0.6.5, jax 0.4.23 (bench/.venv-nt)"
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_description()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{nt_versions}, float32, CPU only. Load average at the end of the run: "
        f"{os.getloadavg()[0]:.1f} (other jobs shared the cores, so times are noisy).",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({seconds:.0f} s in total).",
        "",
        f"Full kernel K(x, x) of shape (n, n, {FLAGS.num_classes}, {FLAGS.num_classes}) on random "
        "normal inputs at the seed-0 initial weights. inputs/s is n divided by the seconds of one "
        "kernel computation after tracing (tfntk) or compiling (neural-tangents, timed on its second "
        "call). Peak memory is the case's own process. 'vs tfntk' is the largest absolute "
        "difference to the tfntk 'jacobian' kernel on the same inputs, relative to its largest entry. "
        "'vs float64' is the same against a float64 reference: the float64 contraction of "
        "per-example Jacobians from a plain tf.GradientTape, on inputs 0 and 1 and the "
        f"{FLAGS.reference_inputs} inputs whose kernel rows differ most between the libraries "
        "(listed per model below the table; a kernel over fewer inputs is compared on those it covers). "
        f"tfntk used batch_size={FLAGS.batch_size} and jacobian_memory_gib={FLAGS.jacobian_memory_gib}.",
        "",
        "| model | parameters | library | implementation | n | seconds | inputs/s | peak memory (GiB) | vs tfntk | vs float64 | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['parameters']:,} | {row['library']} | {row['implementation']} | "
                         f"{row['n']} | - | - | - | - | - | {row['error']} |")
            continue
        difference = "-" if row.get("difference") is None else f"{row['difference']:.1e}"
        error = "-" if row.get("float64_error") is None else f"{row['float64_error']:.1e}"
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['library']} | {row['implementation']} | {row['n']} | "
            f"{row['seconds']:.1f} | {row['n'] / row['seconds']:.1f} | {row['peak_gib']:.2f} | {difference} | "
            f"{error} | {row.get('note', '')} |"
        )
    references = {row["model"]: row["reference_inputs"] for row in rows if "reference_inputs" in row}
    if references:
        lines += ["", "Inputs of the float64 reference: " + "; ".join(
            f"{model} {indices}" for model, indices in references.items()) + "."]
    if sweep:
        kind = "logit-traced (n, n)" if FLAGS.sweep_trace_logits else "full (n, n, K, K)"
        lines += [
            "",
            f"Memory sweep: tfntk 'jacobian' on {FLAGS.sweep_model}, {kind} kernel, budget "
            f"{FLAGS.memory_budget_gib} GiB. The Jacobian panel gets the budget minus the memory in use "
            "before the computation, twice the kernel's size and 0.5 GiB of working memory.",
            "",
            "| n | seconds | inputs/s | Jacobian panel (GiB) | peak memory (GiB) | under budget |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for row in sweep:
            if "error" in row:
                lines.append(f"| {row['n']} | - | - | - | - | {row['error']} |")
                continue
            lines.append(
                f"| {row['n']} | {row['seconds']:.1f} | {row['n'] / row['seconds']:.1f} | "
                f"{row['jacobian_memory_gib']:.2f} | {row['peak_gib']:.2f} | "
                f"{'yes' if row['peak_gib'] <= FLAGS.memory_budget_gib else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.worker:
        runner = {"tfntk": run_tfntk_case, "nt": run_nt_case, "reference": run_reference_case}[FLAGS.worker]
        print("RESULT " + json.dumps(runner(json.loads(FLAGS.case))), flush=True)
        return
    if FLAGS.nt_implementations and not os.path.exists(FLAGS.nt_python):
        raise app.UsageError(
            f"{FLAGS.nt_python} not found. Run `bash bench/setup_neural_tangents.sh` or pass --nt_implementations=."
        )
    unknown = [m for m in FLAGS.models if m not in CASES]
    if unknown:
        raise app.UsageError(f"Unknown --models {unknown}; choose from {sorted(CASES)}.")

    start = time.perf_counter()
    rows = [row for model_name in FLAGS.models for row in benchmark_model(model_name)]
    sweep = memory_sweep() if FLAGS.memory_sweep else []
    section = format_section(rows, sweep, time.perf_counter() - start)
    print(section)
    if FLAGS.results:
        write_section(FLAGS.results, section)


if __name__ == "__main__":
    app.run(main)
