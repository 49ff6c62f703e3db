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
    st = r["setup"]
    arch = toy.families.detect(run / "base").name
    loss = toy.ALL_METHODS[a.method][0]
    mult = None if loss == "sft" else (a.beta_mult if a.beta_mult is not None else r["chosen"][a.method]["beta_mult"])
    beta = 1.0 if mult is None else st["beta_scale"][toy.space_key(a.method)] * mult
    common = dict(arch=arch, base=str(run / "base"), pairs_path=str(run / "pairs" / "pairs.jsonl"), rank=st["rank"],
                  pairs=st["pairs"], steps=st["steps"], eval_every=st["eval_every"], sample_steps=st["sample_steps"],
                  resolution=st.get("resolution", toy.RESOLUTION), device=st.get("device", "cpu"))
    jobs = []
    for seed in range(st["seeds"]):
        name = toy.run_name(a.method, st["steps"], a.lr, mult, seed)
        run_dir = out / "runs" / name
        if not run_dir.exists() and (run / "runs" / name / "pytorch_lora_weights.safetensors").is_file():
            shutil.copytree(run / "runs" / name, run_dir)  # trained already (its kept scores say of which captions)
        jobs.append(dict(common, method=a.method, lr=a.lr, beta_mult=mult, beta=beta, seed=seed, run_dir=str(run_dir),
                         prompts=r["split"]["test"], img_seeds=list(range(st["img_seeds"])),
                         score_steps=list(range(st["eval_every"], st["steps"] + 1, st["eval_every"]))))
    new = toy.run_jobs(jobs, a.workers)
    runs = [x for x in r["runs"] if x["method"] != a.method] + new
    for x in runs:  # the JSON's step keys are strings
        x["scores"] = {int(k): v for k, v in x["scores"].items()}
        x["seconds"] = {int(k): v for k, v in x["seconds"].items()}
    chosen = copy.deepcopy(r["chosen"])
    chosen[a.method].update(lr=a.lr, beta_mult=mult, beta=None if mult is None else beta,
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
