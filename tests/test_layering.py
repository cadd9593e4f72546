"""The algorithm and data packages import without Ray, DeepSpeed or MLflow (STYLE.md habit 1)."""

import subprocess
import sys

BLOCK = "import sys\nfor m in ('ray', 'mlflow', 'deepspeed'):\n    sys.modules[m] = None  # makes `import m` fail\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_flowmap_and_data_import_without_ray_mlflow_deepspeed():
    mods = ["pipeline.flowmap." + m for m in ("schedule", "models", "losses", "simulate", "oracle", "draws", "optim",
                                              "lora")]
    mods += ["pipeline.data.schema", "pipeline.data.toy", "pipeline.evaluate", "pipeline.reference", "pipeline.config"]
    # LoRA's peft and accelerate are imported when adapters are added and merged: that must not pull them in
    lora_use = ("from pipeline.flowmap import lora, models\n"
                "net = models.student_from_teacher(models.build_teacher('tiny', seed=0))\n"
                "init = lora.init_generator(0, 'stage2', 'student')\n"
                "lora.merged(lora.add_adapters(net, lora.LoraSettings(2, 2.0), init))\n")
    proc = _run("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + lora_use
                + "print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_block_really_blocks():
    proc = _run("import ray")
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr
