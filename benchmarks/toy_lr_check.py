"""How much a finished toy alignment run's comparison rests on one method's learning rate.

The toy benchmark (`benchmarks/toy_alignment.py`) picks each method's lr (and beta) by the validation reward at the
last step, then measures learning speed on the test captions with that choice. Two lrs can end level on validation
and still climb at very different speeds, so a speed ratio can be a ratio of lrs. This retrains one method of a
finished run with another setting (say its grid's runner-up) with every training seed of the run, scores its
checkpoints exactly as the run scored its own (same base, pairs, test captions, image seeds, sampler), and prints
the run's tables again with it in place of the chosen setting. The run's folder is read, never written.

    python benchmarks/toy_lr_check.py --run outputs/toy-v3-full-flux --method "latent DPO" --lr 3e-3 --out outputs/lr-check

Outputs in --out: table.md (the run's tables with the replacement), lr_check.json (the new runs' scores and the
recomputed summary), runs/ (the new runs; a run the finished run already trained with that setting, the grid's
seed-0 run or, for the chosen setting, every seed, is copied rather than trained again, so the chosen setting
gives back the run's own tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_alignment as toy  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished toy_alignment.py --out folder")
    p.add_argument("--method", required=True, help="the method to retrain, as the run names it (\"latent DPO\")")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta-mult", type=float, help="DPO / CPO: beta multiplier (default: the run's choice)")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    run, out = Path(a.run), Path(a.out)
    saved = run / "toy_alignment.json"
    if not saved.is_file():
        p.error(f"--run {run}: no toy_alignment.json (a finished toy_alignment.py --out folder)")
    r = json.loads(saved.read_text())
    if a.method not in r["chosen"]:
        p.error(f"--method {a.method!r}: the run has {list(r['chosen'])}")
    st = dict(toy.FULL, **r["setup"])  # a run from before the setup named its resolution had the toy's 32 px
    arch = toy.families.detect(run / "base").name
    mult = r["chosen"][a.method]["beta_mult"] if a.beta_mult is None else a.beta_mult
    common = toy.job_common(arch, run / "base", run / "pairs" / "pairs.jsonl", st, st.get("device", "cpu"))
    jobs = [toy.make_job(common, st["beta_scale"], out / "runs", a.method, a.lr, mult, seed, r["split"]["test"],
                         list(range(st["img_seeds"])), toy.checkpoint_steps(st)) for seed in range(st["seeds"])]
    for j in jobs:
        kept = run / "runs" / Path(j["run_dir"]).name
        if not Path(j["run_dir"]).exists() and toy.trained(kept):
            shutil.copytree(kept, j["run_dir"])  # trained already (its kept scores say of which captions)
    mult = jobs[0]["beta_mult"]  # None for SFT
    new = toy.run_jobs(jobs, a.workers)
    runs = [x for x in r["runs"] if x["method"] != a.method] + new
    for x in runs:  # the JSON's step keys are strings
        x["scores"] = {int(k): v for k, v in x["scores"].items()}
        x["seconds"] = {int(k): v for k, v in x["seconds"].items()}
    chosen = copy.deepcopy(r["chosen"])
    chosen[a.method].update(lr=a.lr, beta_mult=mult, beta=None if mult is None else jobs[0]["beta"],
                            grid=f"replaced: lr {a.lr:g}" + ("" if mult is None else f", beta x{mult:g}"))
    summary = toy.summarise(runs, np.array(r["base_test_scores"]), chosen, r["flops_per_step"])
    tables = toy.format_tables(dict(r, chosen=chosen, summary=summary))
    command = shlex.join(["python", "benchmarks/toy_lr_check.py", *(sys.argv[1:] if argv is None else argv)])
    result = dict(command=command, run=str(run), method=a.method, lr=a.lr, beta_mult=mult, chosen=chosen,
                  summary=summary, runs=[{k: x[k] for k in ("method", "seed", "lr", "beta", "run_dir", "scores")}
                                         for x in new])
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(tables + "\n")
    (out / "lr_check.json").write_text(json.dumps(toy.jsonable(result), separators=(",", ":")))
    print(f"command: {command}\n{tables}")
    return result


if __name__ == "__main__":
    main()
