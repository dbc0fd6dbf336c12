"""tfcert from Python only, as a notebook would use it (``tfcert.runs``).

    python examples/python_runs.py [--output_dir=runs/python_runs]

1. trains the README demo's STN model on mnist_subset (`runs.train`);
2. certifies 50 test images (`runs.certify`) in a child process that is killed
   (SIGKILL) once some rows are written, then resumes the same run in this process;
3. runs ``certify.py`` with the same settings into another folder and checks that
   both runs have the same rows (every column but the seconds spent).

Each step prints what it did; the script exits non-zero if the rows differ.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's tfcert, as the root scripts do

from tfcert import runs  # noqa: E402  (after the path)

SIGMA = 0.5


def certify_config(model: str, output_dir: str) -> runs.CertifyConfig:
    """50 test images, n = 500, Rényi and Cohen radii (the README demo's settings)."""
    return runs.CertifyConfig(model=model, dataset="mnist_subset", sigma=SIGMA,
                              num_examples=50, num_samples=500, alpha=0.001,
                              bounds=("renyi", "cohen"), output_dir=output_dir)


def rows_of(path: str) -> list[dict]:
    """The TSV's rows without the timing column."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"}
                for row in csv.DictReader(f, delimiter="\t")]


def killed_then_resumed(model: str, output_dir: str) -> None:
    """Starts the certification in a child process, kills it after its 5th row, then
    resumes the same run here."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from tfcert import runs; from examples.python_runs import certify_config; "
         "runs.certify(certify_config(sys.argv[2], sys.argv[3]))", ROOT, model, output_dir],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tsv = os.path.join(output_dir, "certify.tsv")
    while child.poll() is None and (not os.path.exists(tsv) or len(rows_of(tsv)) < 5):
        time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    print(f"killed the child after {len(rows_of(tsv))} rows; resuming in this process")
    runs.certify(certify_config(model, output_dir))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/python_runs")
    out = parser.parse_args().output_dir
    train_dir = os.path.join(out, "train")
    model = os.path.join(train_dir, "model.keras")
    if not os.path.exists(model):
        metrics = runs.train(runs.TrainConfig(dataset="mnist_subset", method="stn", sigma=SIGMA,
                                              gamma=1.0, epochs=3, output_dir=train_dir))
        print(f"trained {model}: {metrics}")
    python_dir, cli_dir = os.path.join(out, "certify_python"), os.path.join(out, "certify_cli")
    killed_then_resumed(model, python_dir)
    subprocess.run([sys.executable, os.path.join(ROOT, "certify.py"), f"--model={model}",
                    "--dataset=mnist_subset", f"--sigma={SIGMA}", "--num_examples=50",
                    "--num_samples=500", "--alpha=0.001", "--bounds=renyi,cohen",
                    f"--output_dir={cli_dir}"], check=True, cwd=ROOT)
    ours, theirs = (rows_of(os.path.join(d, "certify.tsv")) for d in (python_dir, cli_dir))
    same = ours == theirs
    print(f"{len(ours)} rows from Python (killed and resumed), {len(theirs)} from certify.py: "
          f"{'identical' if same else 'DIFFERENT'} (every column but seconds)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
