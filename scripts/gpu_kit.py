"""The packages ncp needs that the lent GPU machines' image lacks, as wheels in `.gpu-kit/` (git-ignored), made
here where pip reaches the package registries; that machine reaches none.

The image (Python 3.12, torch with CUDA 13) has torch, accelerate, transformers, huggingface_hub, safetensors, pandas,
pyarrow and the rest of the scientific stack, but no diffusers, bitsandbytes or datasets, and other versions of
transformers and peft than requirements.txt pins. The kit holds those, at requirements.txt's versions.
bitsandbytes ships one library per CUDA version (129 MB unpacked, 43 MB as a wheel); the kit keeps the CUDA 13
ones and the CPU one, so the kit and the repository fit one device call (64 MiB in all).

    python scripts/gpu_kit.py                  # writes .gpu-kit/*.whl and prints its size
    # then on the GPU machine, with .gpu-kit carried: bash scripts/gpu_check.sh (it installs the kit first)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["diffusers", "transformers", "peft", "bitsandbytes", "datasets", "dill", "multiprocess", "regex"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
KEEP_CUDA = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the image's CUDA 13 (and the CPU fallback)
LIMIT_MIB = 64


def pinned(requirements: Path, names: list[str]) -> list[str]:
    """name==version for each of `names`: requirements.txt's pin, or (dill, multiprocess: datasets' own needs;
    regex: transformers' own, checked at import, and the image's may be older) the version installed here."""
    from importlib.metadata import version

    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", requirements.read_text(), re.M))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    return [f"{n}=={pins.get(n) or version(n)}" for n in names]


def slim_wheel(path: Path, keep: re.Pattern = KEEP_CUDA) -> int:
    """Rewrite the wheel at `path` without the shared libraries `keep` does not match (any `*.so` named
    libbitsandbytes_*), with its RECORD listing what is left; returns the bytes removed (unpacked)."""
    dropped, tmp = 0, path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        gone = {i.filename for i in src.infolist()
                if re.search(r"libbitsandbytes_\w+\.so$", i.filename) and not keep.search(i.filename)}
        for info in src.infolist():
            if info.filename in gone:
                dropped += info.file_size
            elif info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in src.read(info).decode().splitlines() if ln.split(",")[0] not in gone]
                dst.writestr(info, "\n".join(lines) + "\n")
            else:
                dst.writestr(info, src.read(info))
    tmp.replace(path)
    return dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / ".gpu-kit"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()  # one version of each: two stop the whole install there
    specs = pinned(ROOT / "requirements.txt", PACKAGES)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[x for pl in PLATFORMS for x in ("--platform", pl)], "-d", str(out), *specs]
    subprocess.run(cmd, check=True)
    for wheel in out.glob("bitsandbytes-*.whl"):
        print(f"{wheel.name}: {slim_wheel(wheel) / 2**20:.0f} MiB of other CUDA versions' libraries left out")
    kit = sum(w.stat().st_size for w in out.glob("*.whl")) / 2**20
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    repo = sum((ROOT / f.decode()).stat().st_size for f in tracked if f and (ROOT / f.decode()).is_file()) / 2**20
    print(f"{out}: {', '.join(specs)}; {kit:.1f} MiB, with the repository's tracked files {kit + repo:.1f} MiB "
          f"(one device call carries at most {LIMIT_MIB})")
    return 0 if kit + repo < LIMIT_MIB else 1


if __name__ == "__main__":
    raise SystemExit(main())
