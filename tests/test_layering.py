"""The algorithm and data packages import without Ray, DeepSpeed or MLflow (STYLE.md habit 1)."""

import subprocess
import sys

BLOCK = "import sys\nfor m in ('ray', 'mlflow', 'deepspeed'):\n    sys.modules[m] = None  # makes `import m` fail\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_flowmap_and_data_import_without_ray_mlflow_deepspeed():
    mods = ["pipeline.flowmap." + m for m in ("schedule", "models", "losses", "simulate", "oracle", "draws", "optim")]
    mods += ["pipeline.data.schema", "pipeline.data.toy", "pipeline.evaluate", "pipeline.reference", "pipeline.config"]
    proc = _run("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + "print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_block_really_blocks():
    proc = _run("import ray")
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr
