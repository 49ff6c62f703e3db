"""A two-point sweep on the tiny default runs, evaluates each point and writes its summary table."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_point_sweep_with_toy_evaluation(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    env = {**os.environ, "LAUNCH": sys.executable, "EVAL_PROMPTS": str(prompts), "EVAL_REWARD": "toy",
           "EVAL_GENERATE_ARGS": "--steps 2 --batch-size 2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "sweep"
    cmd = ["bash", str(ROOT / "scripts/sweep.sh"), str(out), "train_ncp_dpo.py", "configs/tiny_sd15_ncp_dpo.yaml",
           "objective.space=perceptual,latent", "--", f"model.pretrained={tiny_sd15}", "train.max_steps=2",
           "train.batch_size=2", "data.toy_num_pairs=8", "lora.rank=4", "train.validate_every=0", "train.validation_prompts=[]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["point"] for r in rows] == ["objective.space=latent", "objective.space=perceptual"]
    for r in rows:
        assert r["steps"] == "2" and r["done"] == "True"
        assert 0.0 <= float(r["toy mean"]) <= 1.0 and 0.0 <= float(r["toy win rate vs base"]) <= 1.0
    assert "objective.space=latent" in (out / "summary.md").read_text()
    # running it again trains and evaluates nothing; an evaluation that did not finish runs again, alone
    results = {p: out / p / "eval" / "results.json" for p in ("objective.space=latent", "objective.space=perceptual")}
    stamps = {p: f.stat().st_mtime_ns for p, f in results.items()}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.count("trained") == 2 and {p: f.stat().st_mtime_ns for p, f in results.items()} == stamps
    results["objective.space=latent"].unlink()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("trained") == 2
    assert results["objective.space=latent"].exists()
    assert results["objective.space=perceptual"].stat().st_mtime_ns == stamps["objective.space=perceptual"]
