"""scripts/gpu_check.sh's plan, checked on any machine by its dry run (every stage charged its
whole limit): test_gpu.py runs first, the whole fits the device run's 8 minutes by the script's
own accounting, and it writes only files the device tool returns (at most 8, two folders down)."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_plan(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1")
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.txt").read_text()
    stages = re.findall(r"^(\w+): (dry run|skipped)", summary, re.M)
    names = [n for n, _ in stages]
    assert names[:3] == ["build", "info", "gpu_tests"], summary
    assert "tests/test_gpu.py --junitxml=" in summary and f"{out}/junit_gpu.xml" in summary
    total = int(re.search(r"^total: (\d+)s of a (\d+)s budget", summary, re.M).group(1))
    assert total <= 480, summary
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
