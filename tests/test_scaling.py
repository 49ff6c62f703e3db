"""configs/accelerate/: every file is a valid accelerate config that `accelerate launch --config_file` runs.

The 8-GPU file also launches the two-process training test (tests/test_train.py); here the other two start
real processes on CPU (ACCELERATE_USE_CPU=1: gloo) with only the process counts overridden.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {"1gpu.yaml": ("NO", 1, 1), "8gpu.yaml": ("MULTI_GPU", 8, 1), "2nodes_8gpu.yaml": ("MULTI_GPU", 16, 2)}
PROBE = """from accelerate import Accelerator
a = Accelerator()
print(f"rank {a.process_index} of {a.num_processes} {a.distributed_type.value}", flush=True)
"""


def test_accelerate_config_files_say_what_they_are():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (kind, processes, machines) in EXPECTED.items():
        cfg = load_config_from_file(str(CONFIGS / name))
        assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines) == (kind, processes, machines), name
        assert cfg.mixed_precision == "fp16" and not cfg.use_cpu
        first = (CONFIGS / name).read_text().splitlines()[:3]
        assert any(f"accelerate launch -q --config_file configs/accelerate/{name} train_ncp_dpo.py" in line
                   or f"--config_file configs/accelerate/{name} --machine_rank 0" in line for line in first), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name, extra, ranks", [
    ("1gpu.yaml", [], 1),
    ("2nodes_8gpu.yaml", ["--num_machines", "1", "--num_processes", "2", "--main_process_ip", "127.0.0.1"], 2),
])
def test_accelerate_launch_accepts_the_file(tmp_path, name, extra, ranks):
    (tmp_path / "probe.py").write_text(PROBE)
    if ranks > 1:  # a port nothing else on this machine holds (a fixed one may be taken by another job)
        extra = [*extra, "--main_process_port", str(free_port())]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / name), *extra,
           "--mixed_precision", "no", str(tmp_path / "probe.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    kind = "NO" if ranks == 1 else "MULTI_CPU"
    # the processes share one stdout, so two lines can arrive interleaved: find the records, not lines
    assert sorted(re.findall(r"rank \d+ of \d+ [A-Z_]+?(?=rank|\s|$)", proc.stdout)) == \
        [f"rank {r} of {ranks} {kind}" for r in range(ranks)]
