"""configs/accelerate/: every file is a valid accelerate config that `accelerate launch --config_file` runs.

The 8-GPU file also launches the two-process training test (tests/test_train.py); here the other two start
real processes on CPU (ACCELERATE_USE_CPU=1: gloo) with only the process counts overridden. Two "machines" on
localhost, each with its own working directory, train, stop, and resume from node-local output folders.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
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


def test_two_machines_with_node_local_output_dirs(tiny_sd15, tmp_path):
    """Two machine ranks on localhost, each in its own directory with a relative train.output_dir: both folders
    get complete checkpoints, a SIGTERM to both stops them together, the resume command names 2 machines, and
    resuming on both continues the run."""
    from test_train import args, metrics

    port, nodes = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}

    def launch(rank, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "train_ncp_dpo.py"), *args(tiny_sd15, "run", "train.grad_accum=2", "train.checkpoint_every=2",
                                                     "train.report_to=none", *extra)]
        with open(nodes[rank] / "stderr.txt", "a") as err:
            return subprocess.Popen(cmd, env=env, cwd=nodes[rank], stderr=err, stdout=subprocess.DEVNULL,
                                    start_new_session=True)

    for node in nodes:
        node.mkdir()
    procs = [launch(r, "train.max_steps=100000") for r in (0, 1)]
    deadline = time.time() + 240
    while not ((nodes[0] / "run/metrics.jsonl").exists() and len(metrics(nodes[0] / "run")) >= 3) \
            and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    text = (nodes[0] / "stderr.txt").read_text()
    assert all(c != 0 for c in codes), text[-3000:]  # stopped by the signal (the launcher reports it as 1)
    last = [sorted((n / "run" / "checkpoints").glob("checkpoint-*"))[-1] for n in nodes]
    assert last[0].name == last[1].name, text[-3000:]
    for rank, ckpt in enumerate(last):  # each machine's own complete copy, with its own process's files
        assert (ckpt / "ncp_state.json").exists() and (ckpt / "pytorch_lora_weights.safetensors").exists()
        assert [p.name for p in ckpt.glob("generator_*")] == [f"generator_{rank}.safetensors"]
    assert re.search(r"--num_processes 2 --num_machines 2 --machine_rank 0 --main_process_ip 127.0.0.1", text), \
        text[-3000:]
    step = json.loads((last[0] / "ncp_state.json").read_text())["step"]
    procs = [launch(r, f"train.max_steps={step + 2}", "train.resume_from=latest") for r in (0, 1)]
    codes = [p.wait(timeout=240) for p in procs]
    text = (nodes[0] / "stderr.txt").read_text()
    assert codes == [0, 0], text[-3000:]
    assert [r["step"] for r in metrics(nodes[0] / "run")][-3:] == [step, step + 1, step + 2]
    assert f"resumed from run/checkpoints/{last[0].name}" in text
