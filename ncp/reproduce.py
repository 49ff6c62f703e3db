"""The paper's Table 1 and Figure 3 in one command, in stages that are skipped when their output exists.

    bash scripts/reproduce.sh sd15 outputs/repro-sd15          # = python -m ncp.reproduce --settings configs/reproduce/sd15.yaml --out ...

Stages (settings from a YAML, `configs/reproduce/{sd15,sdxl,tiny}.yaml`; copy and shrink it for a smaller run;
`tiny` runs every stage offline on a CPU: the toy base, toy pairs, toy captions and the toy reward):
1. prepare   `ncp.data.prepare`: stream the mirror, keep the filtered pairs (+ latent cache) -> OUT/data/
2. train     every run of `train.runs` (NCP-DPO and latent DPO) with the same data, steps, seed -> OUT/runs/<name>/
             (a run folder without its final LoRA is resumed with train.resume_from=latest)
3. generate  base + each LoRA on every prompt set at fixed seeds (`ncp.generate`) -> OUT/gen/<set>/index.jsonl
4. score     each reward (`ncp.evaluate`; unavailable ones are skipped and named) -> OUT/eval/<set>/scores.jsonl
5. curves    reward vs step over every checkpoint of every run (`ncp.curves`, Figure 3) -> OUT/curves/
6. report    OUT/report.md: Table 1 layout (win rates over the base and first run vs second, 95% Wilson
             intervals), the curves, sample grids, the settings and run configs, each stage's wall time.
Before it starts it prints an estimate of each stage's GPU time from the settings' `estimate` section.
Stages 3-5 record what they were made with (their settings, and the times of the files they read) in
<folder>/made_with.json; output made with other settings is refused, not reused beside the new settings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ncp.errors import NcpError, run_cli

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "train", "generate", "score", "curves", "report")
SECTIONS = {"model", "vae", "resolution", "device", "prepare", "train", "generate", "score", "curves", "estimate"}


# ---------------------------------------------------------------- settings
def load_settings(path: str | Path) -> dict:
    """The settings YAML, with every section present and unknown keys refused (naming the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise NcpError(f"--settings: {path} does not exist")
    s = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(s) - SECTIONS)
    if unknown:
        raise NcpError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(SECTIONS))})")
    for key in ("model", "prepare", "train", "generate", "score", "curves"):
        if key not in s:
            raise NcpError(f"{path}: missing key {key!r}")
    runs = s["train"].get("runs") or {}
    if len(runs) < 2:
        raise NcpError(f"{path}: train.runs needs two runs (NCP-DPO first, then the latent DPO it is compared with)")
    for name, run in runs.items():
        for k in ("script", "config"):
            if k not in run:
                raise NcpError(f"{path}: train.runs.{name} has no {k!r}")
    s.setdefault("vae", None)
    s.setdefault("resolution", 512)
    s.setdefault("device", None)
    s.setdefault("estimate", {})
    s["_path"] = str(path)
    return s


def run_overrides(s: dict, out: Path, name: str) -> list[str]:
    """What every run shares (model, data, user overrides) plus its own output folder."""
    data = out / "data"
    o = [f"model.pretrained={s['model']}", "data.source=parquet", f"data.path={data / 'pairs'}", "data.filter=none",
         f"data.resolution={s['resolution']}", "train.keep_checkpoints=100000"]  # every checkpoint: the curves' points
    if s["vae"]:
        o.append(f"model.vae={s['vae']}")
    if s["prepare"].get("cache", False):
        o.append(f"data.cache_dir={data / 'cache'}")
    return o + list(s["train"].get("overrides") or []) + [f"train.output_dir={out / 'runs' / name}"]


def resolved_runs(s: dict, out: Path) -> dict:
    """name -> resolved Config of each run; refuses runs that differ in data, steps, seed or batch."""
    from ncp.config import load_config

    cfgs = {}
    for name, run in s["train"]["runs"].items():
        cfgs[name] = load_config(str(ROOT / run["config"]), run_overrides(s, out, name) + list(run.get("overrides") or []))
    same = lambda c: (c.train.max_steps, c.train.seed, c.train.batch_size, c.train.grad_accum, c.data)  # noqa: E731
    first = next(iter(cfgs))
    for name, c in cfgs.items():
        if same(c) != same(cfgs[first]):
            raise NcpError(f"train.runs.{name}: must train with the same data, steps, seed and batch as {first}")
    return cfgs


# ---------------------------------------------------------------- estimate
def count_prompts(spec: dict) -> int:
    """Prompts of a set for the estimate: a file's lines, or the size of a named set (docs/method.md, "Evaluation prompts")."""
    kind = str(spec.get("prompts"))
    full = {"parti": 1632, "pickapic": 500, "hpsv2": 3200, "toy": 18}
    size = sum(1 for line in Path(kind).read_text().splitlines() if line.strip()) if Path(kind).is_file() else full.get(kind, 0)
    return min(size, spec.get("max_prompts") or size)


def estimate(s: dict, cfgs: dict, prompt_counts: dict) -> dict:
    """GPU-seconds per stage from the settings' per-unit costs (assumptions, printed as such)."""
    e = s["estimate"]
    g, c = s["generate"], s["curves"]
    n_models = 1 + len(cfgs)
    images = sum(n * len(g.get("seeds", [0])) for n in prompt_counts.values()) * n_models
    steps = {name: cfg.train.max_steps for name, cfg in cfgs.items()}
    ckpts = sum(len(range(cfg.train.checkpoint_every, cfg.train.max_steps + 1, cfg.train.checkpoint_every)) + 1
                for cfg in cfgs.values())
    curve_images = count_prompts(c) * len(c.get("seeds", [0])) * (ckpts + 1)
    return {
        "prepare": e.get("cache_image", 0) * 2 * e.get("pairs", 0) if s["prepare"].get("cache") else 0.0,
        "train": sum(e.get("train_step", 0) * n for n in steps.values()),
        "generate": e.get("image", 0) * images,
        "score": e.get("score", 0) * images * len(s["score"].get("rewards", [])),
        "curves": (e.get("image", 0) + e.get("score", 0)) * curve_images,
        "report": 0.0,
    }


# ---------------------------------------------------------------- stages
def prompts_of(spec: dict, name: str) -> list[str]:
    """A prompt set: `prompts` = a text file, `pickapic` / `parti` (with optional `path`, `split`), or `hpsv2`."""
    from ncp.generate import PROMPT_SETS, _read_column, load_prompts

    kind, limit = spec.get("prompts"), spec.get("max_prompts")
    if kind is None:
        raise NcpError(f"generate.prompt_sets.{name}: no 'prompts' (a text file, pickapic, parti, hpsv2 or toy)")
    if kind == "toy":  # the toy captions held out from the toy pairs (ncp.toy_base), scored by the toy reward
        from ncp.toy_base import split_captions

        return split_captions()["test"][:limit]
    if kind == "hpsv2":  # the HPD v2 benchmark prompts ship with the hpsv2 package
        try:
            import hpsv2
        except Exception as e:  # noqa: BLE001
            raise NcpError(f"generate.prompt_sets.{name}: hpsv2 is not importable ({type(e).__name__}); "
                           "install it or remove this set") from e
        rows = [p for ps in hpsv2.benchmark_prompts("all").values() for p in ps]
        return rows[:limit] if limit else rows
    if kind in PROMPT_SETS and spec.get("split"):
        hub_id, _, column = PROMPT_SETS[kind]
        return _read_column(spec.get("path") or hub_id, spec["split"], column, limit)
    return load_prompts(kind, spec.get("path"), limit)


def stage_prepare(s: dict, out: Path) -> bool:
    from ncp.data.prepare import prepare, read_manifest

    p, data = s["prepare"], out / "data"
    source, path = p.get("source", "hub"), p.get("path")
    if source == "toy":  # toy pairs of the train captions in the Pick-a-Pic schema, read as local shards
        from ncp.toy_base import split_captions, write_toy_mirror

        source, path = "parquet", str(data / "toy-mirror")
        if not (data / "toy-mirror" / "data").is_dir():
            write_toy_mirror(data / "toy-mirror", split_captions()["train"], p.get("toy_pairs", 64))
    m = read_manifest(data)
    cache_done = not p.get("cache") or (data / "cache" / "manifest.json").exists() and \
        json.loads((data / "cache" / "manifest.json").read_text()).get("complete")
    if m and m.get("complete") and cache_done:
        return False
    prepare(source, path, data, p.get("split", "train"), p.get("filter", "absolute_winners"),
            p.get("max_pairs"), p.get("shard_size", 1000), p.get("on_bad_image", "skip"),
            s["model"] if p.get("cache") else None, s["resolution"], s["vae"], device(s))
    return True


def stage_train(s: dict, out: Path) -> bool:
    ran = False
    launch = shlex.split(s["train"].get("launch", "accelerate launch -q"))
    launch = [sys.executable if a == "python" else a for a in launch]
    for name, run in s["train"]["runs"].items():
        folder = out / "runs" / name
        if (folder / "pytorch_lora_weights.safetensors").exists():
            continue
        extra = ["train.resume_from=latest"] if (folder / "config.yaml").exists() else []
        cmd = [*launch, str(ROOT / run["script"]), "--config", str(ROOT / run["config"]),
               *run_overrides(s, out, name), *(run.get("overrides") or []), *extra]
        print(f"train {name}: {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise NcpError(f"train.runs.{name}: training failed (command above; rerun to resume it)")
        ran = True
    return ran


MADE_WITH = "made_with.json"


def made_with(folder: Path, output: str, settings: dict) -> bool:
    """Whether `folder` holds the stage's finished `output`, made with `settings` (then it is reused). Output made
    with other settings is refused: the report would print these settings beside other numbers. Output from
    before stages recorded their settings is reused."""
    stamp = folder / MADE_WITH
    if not (folder / output).exists():
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
        return False
    saved = json.loads(stamp.read_text()) if stamp.is_file() else None
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if saved is not None and saved != now:
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        raise NcpError(f"{folder}: made with other settings or inputs ({', '.join(changed)} changed); delete it to "
                       "make it again, or use another --out")
    return True


def file_times(paths) -> dict:
    """{path: modification time} of the files a stage reads: a retrained LoRA or a new index is another input."""
    return {str(p): Path(p).stat().st_mtime_ns for p in paths}


def stage_generate(s: dict, out: Path, pipe_cache: dict) -> bool:
    from ncp.generate import generate
    from ncp.models import LORA_FILE

    g, ran = s["generate"], False
    loras = file_times(out / "runs" / run / LORA_FILE for run in s["train"]["runs"])
    for name, spec in g["prompt_sets"].items():
        folder = out / "gen" / name
        if made_with(folder, "index.jsonl", dict(model=s["model"], prompts=spec, loras=loras,
                                                   **{k: v for k, v in g.items() if k not in ("prompt_sets", "batch_size")})):
            continue
        specs = [f"{run}={out / 'runs' / run}" for run in s["train"]["runs"]]
        generate(s["model"], specs, prompts_of(spec, name), folder, g.get("seeds", [0]), g.get("batch_size", 4),
                 g.get("guidance"), g.get("steps", 25), g.get("resolution"), g.get("negative_prompt"),
                 pipe=pipeline(s, pipe_cache))
        ran = True
    return ran


def stage_score(s: dict, out: Path) -> bool:
    from ncp.evaluate import evaluate

    ran = False
    for name in s["generate"]["prompt_sets"]:
        folder = out / "eval" / name
        index = out / "gen" / name / "index.jsonl"
        if made_with(folder, "results.json", dict(rewards=s["score"].get("rewards", ["pickscore"]),
                                                  index=file_times([index]))):
            continue
        evaluate(out / "gen" / name / "index.jsonl", s["score"].get("rewards", ["pickscore"]), folder,
                 batch_size=s["score"].get("batch_size", 16), device=device(s))
        ran = True
    return ran


def stage_curves(s: dict, out: Path, pipe_cache: dict) -> bool:
    import torch

    from ncp.curves import curves, run_loras
    from ncp.evaluate import make_scorer
    from ncp.models import LORA_FILE

    c, g = s["curves"], s["generate"]
    runs = [out / "runs" / r for r in s["train"]["runs"]]
    render = {k: g.get(k) for k in ("steps", "guidance", "resolution", "negative_prompt", "dtype")}
    loras = file_times(lora / LORA_FILE for run in runs for _, lora in run_loras(run))  # the LoRAs curves scores
    if made_with(out / "curves", "curves.json", dict(model=s["model"], curves=c, render=render, checkpoints=loras)):
        return False
    reward = c.get("reward", "pickscore")
    with torch.no_grad():
        curves([out / "runs" / r for r in s["train"]["runs"]], pipeline(s, pipe_cache), prompts_of(c, "curves"),
               c.get("seeds", [0]), make_scorer(reward, device(s)), out / "curves", reward,
               batch_size=g.get("batch_size", 4), steps=g.get("steps", 25), guidance=g.get("guidance"),
               resolution=g.get("resolution"), negative_prompt=g.get("negative_prompt"))
    return True


def device(s: dict) -> str:
    import torch

    return s["device"] or ("cuda" if torch.cuda.is_available() else "cpu")


def pipeline(s: dict, cache: dict):
    from ncp.generate import dtype_of, load_pipeline

    if "pipe" not in cache:
        cache["pipe"] = load_pipeline(s["model"], device(s), dtype_of(s["generate"].get("dtype", "fp32")))
    return cache["pipe"]


# ---------------------------------------------------------------- report
def table(s: dict, out: Path) -> dict:
    """Per prompt set and reward: win rate of each run over the base and of the first run over the second."""
    from ncp.evaluate import win_rate

    runs = list(s["train"]["runs"])
    comparisons = [(r, "base") for r in runs] + [(runs[0], runs[1])]
    result = {}
    for name in s["generate"]["prompt_sets"]:
        rows = [json.loads(line) for line in (out / "eval" / name / "scores.jsonl").read_text().splitlines() if line]
        ev = json.loads((out / "eval" / name / "results.json").read_text())
        result[name] = {"skipped": ev["skipped"], "rewards": {}}
        for reward in ev["rewards"]:
            by = {}
            for r in rows:
                by.setdefault(r["model"], {})[(r["prompt_idx"], r["seed"])] = r[reward]
            result[name]["rewards"][reward] = {f"{a} vs {b}": win_rate(by[a], by[b]) for a, b in comparisons}
    return result


def grid(out: Path, name: str, models: list[str], n: int = 4) -> Path:
    """First n prompts (first seed) of a prompt set: a row per prompt, a column per model."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    rows = [json.loads(line) for line in (out / "gen" / name / "index.jsonl").read_text().splitlines() if line]
    seed = rows[0]["seed"]
    idx = sorted({r["prompt_idx"] for r in rows})[:n]
    path_of = {(r["model"], r["prompt_idx"]): r["path"] for r in rows if r["seed"] == seed}
    images = [Image.open(out / "gen" / name / path_of[(m, i)]).convert("RGB") for i in idx for m in models]
    path = out / "grids" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(idx), cols=len(models)).save(path)
    return path


def write_report(s: dict, out: Path, cfgs: dict, times: dict, est: dict) -> Path:
    runs = list(s["train"]["runs"])
    numbers = table(s, out)
    (out / "report.json").write_text(json.dumps(numbers, indent=2))
    md = [f"# Reproduction report: {Path(s['_path']).name}", "",
          f"Base model `{s['model']}`; runs {', '.join(f'`{r}`' for r in runs)} trained on the same prepared data "
          f"({out / 'data' / 'pairs'}), steps and seed. Win rate = share of (prompt, seed) images scored higher, "
          "ties as half, with its 95% Wilson score interval.", "", "## Table 1", ""]
    for name, entry in numbers.items():
        cols = list(entry["rewards"])
        md += [f"**{name}**", "", "| comparison | " + " | ".join(f"{r} win rate [95% CI]" for r in cols) + " |",
               "|---|" + "---|" * len(cols)]
        comps = list(next(iter(entry["rewards"].values()))) if cols else []
        for comp in comps:
            cells = [f"{w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] (n={w['n']}, {w['prompts']} prompts)"
                     for w in (entry["rewards"][r][comp] for r in cols)]
            md.append(f"| {comp} | " + " | ".join(cells) + " |")
        md += [f"\nSkipped {k}: {v}" for k, v in entry["skipped"].items()] + [""]
    md += ["## Reward vs step (Figure 3)", "", "![curves](curves/curves.png)", ""]
    md += ["## Samples (first seed; columns: base, " + ", ".join(runs) + ")", ""]
    for name in s["generate"]["prompt_sets"]:
        md += [f"![{name}]({grid(out, name, ['base', *runs]).relative_to(out)})", ""]
    md += ["## Stages", "", "| stage | wall time | status | estimated GPU time |", "|---|---|---|---|"]
    for st in STAGES[:-1]:  # (this report takes a second or two)
        t = times.get(st, {})
        md.append(f"| {st} | {t.get('seconds', 0):.1f} s | {t.get('status', '-')} | {est.get(st, 0) / 3600:.2f} h |")
    md += ["", "## Settings", "", "```yaml", Path(s["_path"]).read_text().rstrip(), "```", ""]
    for name in runs:
        md += [f"### Run `{name}` (resolved config.yaml)", "", "```yaml",
               (out / "runs" / name / "config.yaml").read_text().rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


# ---------------------------------------------------------------- main
def reproduce(settings: str | Path, out: str | Path) -> Path:
    s = load_settings(settings)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if s["model"] == "toy":  # the shipped toy base (ncp.toy_base), written into the output folder once
        from ncp.toy_base import write_base

        s["model"] = str(out / "base")
        if not (out / "base" / "model_index.json").is_file():
            write_base(out / "base")
    cfgs = resolved_runs(s, out)  # every run's config is validated before any stage starts
    counts = {n: count_prompts(spec) for n, spec in s["generate"]["prompt_sets"].items()}
    est = estimate(s, cfgs, counts)
    print("estimated GPU time per stage (per-unit costs from the settings' `estimate` section, not measured here):")
    for st in STAGES:
        print(f"  {st:9s} {est[st] / 3600:8.2f} h")
    times_path = out / "stages.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    pipe_cache: dict = {}
    steps = {"prepare": lambda: stage_prepare(s, out), "train": lambda: stage_train(s, out),
             "generate": lambda: stage_generate(s, out, pipe_cache), "score": lambda: stage_score(s, out),
             "curves": lambda: stage_curves(s, out, pipe_cache)}
    for st, fn in steps.items():
        start = time.time()
        ran = fn()
        if ran:
            times[st] = {"seconds": time.time() - start, "status": "ran"}
        else:
            times.setdefault(st, {"seconds": 0.0})["status"] = "skipped (output exists)"
        print(f"stage {st}: {times[st]['status']} ({times[st]['seconds']:.1f} s)", flush=True)
        times_path.write_text(json.dumps(times, indent=1))
    report = write_report(s, out, cfgs, times, est)
    print(f"report: {report}")
    return report


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", required=True, help="configs/reproduce/sd15.yaml, sdxl.yaml or your copy")
    p.add_argument("--out", required=True, help="output folder (stages whose output exists there are skipped)")
    a = p.parse_args(argv)
    return reproduce(a.settings, a.out)


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
