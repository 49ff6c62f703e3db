"""Shared fixtures: tiny SD1.5 / SDXL pipeline folders, built once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # tests side by side (scripts/test.sh): one core each, for them and their children
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def ieee_subnormals_after_each_test():
    """A CPU training run flushes subnormal floats for the rest of its process (ncp/train.py); a test that runs
    one in this process must not hand that to the next test."""
    yield
    import torch

    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from ncp.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from ncp.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_paths(tiny_sd15, tiny_sdxl):
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded; on a loaded 2-core machine two threads ran 8x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_script(monkeypatch):
    """run_script(loss, argv): train_ncp_<loss>.py's main(argv) in this process, started like a new process."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))

    def run(loss: str, argv: list[str]):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # each run starts like a new process
        return importlib.import_module(f"train_ncp_{loss}").main(argv)

    return run


@pytest.fixture
def load_script():
    """load_script("benchmarks/gpu_check.py"): a script of the repository imported by its path (benchmarks/ and
    scripts/ are folders of scripts, not packages)."""
    import importlib.util
    from pathlib import Path

    def load(path: str):
        file = Path(__file__).resolve().parents[1] / path
        spec = importlib.util.spec_from_file_location(f"script_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
