"""Stream a Pick-a-Pic source, filter it on the fly, write only the pairs that will be trained on.

    python -m ncp.data.prepare --path liuhuohuo2/pick-a-pic-v2 --filter absolute_winners --out data/pick-aw \\
        [--cache-model stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 512]
    accelerate launch -q train_ncp_dpo.py --config configs/sd15_ncp_dpo.yaml \\
        data.source=parquet data.path=data/pick-aw/pairs data.filter=none [data.cache_dir=data/pick-aw/cache]

The source (`--source hub`: a hub id or local dataset folder; `--source parquet`: local shards) is read with
`datasets.load_dataset(..., streaming=True)`: the split is never downloaded or converted as a whole.
1. Pass 1 streams the ranking columns only (caption, uids, labels, ranking_id: parquet column projection, no
   image bytes) and runs the paper's filter (`ncp.data.filter.plan_pairs`: the same pairs as
   `python -m ncp.data.filter`), since "absolute winner" depends on every pair of a prompt. The plan (kept pairs
   and the stream row of each image) goes to `plan.parquet`.
2. It prints the pair count and a disk estimate (image size measured on the first rows), then
3. pass 2 streams the rows again, keeps the bytes of the planned images only, decodes each once (a bad image
   drops its pair, counted and listed in `bad_images.txt`; `--on-bad-image error` stops naming the row) and
   writes `pairs/pairs-<k>.parquet` shards (Pick-a-Pic schema, winner = image 0, label_0 = 1) in plan order,
   in row groups of 8 pairs, so training reads a pair in place (no Arrow copy of the data).
4. Optionally the latent + text cache (`ncp.data.cache`) of those pairs for one model and resolution: `cache/`.
`prepare.json` records the settings and counts. Resumable: a shard exists only when complete (atomic rename),
a rerun streams only from the first row an unfinished shard needs (datasets' stream still reads up to it), and
a finished folder is a no-op. Training on `pairs/` (and `cache/`) needs no network.

`data.source=hub` in a training config runs this once into `data.prepared_dir` (a file lock lets one process
of a node do it while the others wait) and trains map-style on the result: the exact resume position and
per-process sharding of `ShardSampler` need random access, which a stream does not have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tqdm.auto import tqdm

from ncp.data.config import FILTERS, DataConfig
from ncp.data.filter import plan_pairs
from ncp.data.loader import BadImage, open_image
from ncp.data.sources import IMAGE_COLUMNS, orient, resolve_files
from ncp.errors import NcpError, run_cli

MANIFEST = "prepare.json"
RANKING_COLUMNS = ["caption", "image_0_uid", "image_1_uid", "label_0", "label_1"]
ROW_GROUP = 8  # pairs per parquet row group of the output (see sources.ParquetRows)
SAMPLE_ROWS = 16  # rows read to measure the mean image size for the disk estimate


# ---------------------------------------------------------------- the stream
def open_stream(source: str, path: str, split: str, columns: list[str] | None = None):
    """`datasets.IterableDataset` of the split (streaming=True), images as undecoded `{"bytes", "path"}`."""
    import datasets

    try:
        if source == "parquet":
            files = resolve_files(path, split, (".parquet",))
            ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True,
                                       **({"columns": columns} if columns else {}))
        else:
            try:  # parquet-backed (every hub mirror): column projection, image bytes are not fetched
                ds = datasets.load_dataset(path, split=split, streaming=True, **({"columns": columns} if columns else {}))
            except ValueError as e:
                if "columns" not in str(e):
                    raise
                ds = datasets.load_dataset(path, split=split, streaming=True)  # e.g. save_to_disk Arrow files
                ds = ds.select_columns(columns) if columns else ds
    except NcpError:
        raise
    except Exception as e:
        message = str(e)
        if "Unknown split" in message or "Bad split" in message:
            raise NcpError(f"data.split={split!r}: no such split in {path} ({message})") from e
        raise NcpError(f"{path}: cannot stream split {split!r} ({type(e).__name__}: {message})") from e
    for col in IMAGE_COLUMNS:  # an `Image` feature would be decoded to PIL: keep the file's bytes instead
        if ds.features and col in ds.features and isinstance(ds.features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def image_bytes(value) -> bytes | None:
    """The encoded file of one image cell: raw bytes, or datasets' `{"bytes", "path"}`; None for an empty cell
    (a bad image: `_write_shard` drops its pair or stops, as data.on_bad_image says)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.exists(value["path"]):
            return Path(value["path"]).read_bytes()
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    return None


def read_rankings(source: str, path: str, split: str) -> pd.DataFrame:
    """Pass 1: the ranking columns of every row, in stream order (no image bytes)."""
    first = next(iter(open_stream(source, path, split)), None)  # one row: which columns exist
    if first is None:
        raise NcpError(f"{path} (split {split}): no rows")
    missing = [c for c in RANKING_COLUMNS + IMAGE_COLUMNS if c not in first]
    if missing:
        raise NcpError(f"{path} (split {split}): missing column {missing[0]!r} (has {sorted(first)})")
    columns = RANKING_COLUMNS + [c for c in ("ranking_id",) if c in first]
    parts = []
    with tqdm(desc="pass 1: rankings", unit="row") as bar:
        for batch in open_stream(source, path, split, columns).iter(batch_size=10_000):
            parts.append(pd.DataFrame({c: batch[c] for c in columns}))
            bar.update(len(parts[-1]))
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------- the folder
def settings_key(source: str, path: str, split: str, filter: str, max_pairs: int | None, shard_size: int,
                 on_bad_image: str) -> dict:
    """What the output depends on; a folder holding another key is refused, not mixed (`defining`: on_bad_image
    aside, which only decides whether a bad pair is dropped or stops the run before its shard is written)."""
    return {"source": source, "path": os.path.abspath(path) if os.path.exists(path) else path, "split": split,
            "filter": filter, "max_pairs": max_pairs, "shard_size": shard_size, "on_bad_image": on_bad_image}


def defining(key: dict) -> dict:
    """The settings that a folder's shards depend on: a resume may switch on_bad_image (error -> skip)."""
    return {k: v for k, v in key.items() if k != "on_bad_image"}


def default_dir(cfg: DataConfig) -> Path:
    """~/.cache/ncp/prepared/<name>-<split>-<filter>-<hash of the settings>, for data.source=hub; named by the
    settings with on_bad_image at its default, so switching it finds the same folder."""
    key = json.dumps(settings_key(cfg.source, cfg.path, cfg.split, cfg.filter, cfg.max_pairs, 1000, "skip"),
                     sort_keys=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.path.strip("/"))[-60:]
    root = Path(os.environ.get("NCP_CACHE", Path.home() / ".cache" / "ncp"))
    return root / "prepared" / f"{name}-{cfg.split}-{cfg.filter}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise NcpError(f"{path}: not valid JSON ({e}); delete {out} to prepare again") from e


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def estimate(plan: pd.DataFrame, sample: list[int], resolution: int | None) -> str:
    """A line with the pair count and the disk it will take (images measured on the first rows)."""
    mean = float(np.mean(sample)) if sample else 0.0
    gb = 2 * len(plan) * mean / 1e9
    line = (f"{len(plan)} pairs, {plan['caption'].nunique()} prompts, {len(set(plan['w']) | set(plan['l']))} distinct "
            f"images: about {gb:.2f} GB of parquet (2 images per pair, {mean / 1e3:.1f} kB mean image on the first "
            f"{len(sample) // 2} rows)")
    if resolution:
        latents = len(set(plan["w"]) | set(plan["l"])) * 4 * (resolution // 8) ** 2 * 4
        prompts = (plan["caption"].nunique() + 1) * 77 * 2048 * 4  # SDXL's width; SD1.5 takes 768/2048 of it
        line += f"; latent cache about {(latents + prompts) / 1e9:.2f} GB at {resolution} px"
    return line


# ---------------------------------------------------------------- prepare
def prepare(source: str, path: str, out: str | Path, split: str = "train", filter: str = "absolute_winners",
            max_pairs: int | None = None, shard_size: int = 1000, on_bad_image: str = "skip",
            cache_model: str | None = None, resolution: int = 512, vae: str | None = None,
            device: str = "cpu", _after_shard=None) -> Path:
    """Write `out/pairs/` (and `out/cache/` with `cache_model`); returns `out`. See the module docstring."""
    if source not in ("hub", "parquet"):
        raise NcpError(f"--source must be hub or parquet; got {source!r}")
    if filter not in FILTERS:
        raise NcpError(f"--filter must be one of {', '.join(FILTERS)}; got {filter!r}")
    if shard_size < 1 or (max_pairs is not None and max_pairs < 1):
        raise NcpError("--shard-size and --max-pairs must be >= 1")
    out = Path(out)
    key = settings_key(source, path, split, filter, max_pairs, shard_size, on_bad_image)
    manifest = read_manifest(out)
    if manifest is not None and defining(manifest["key"]) != defining(key):
        diff = {k: (manifest["key"].get(k), v) for k, v in defining(key).items() if manifest["key"].get(k) != v}
        raise NcpError(f"{out}: holds pairs prepared with other settings (there, here: {diff}); use another --out")
    if manifest is not None and manifest.get("complete"):
        print(f"{out}: already prepared ({manifest['stats']['pairs']} pairs); nothing to do")
    else:
        manifest = _write_pairs(source, path, split, filter, max_pairs, shard_size, on_bad_image, out, key,
                                resolution if cache_model else None, _after_shard)
    if cache_model:
        from ncp.data.cache import build_cache

        cfg = DataConfig(source="parquet", path=str(out / "pairs"), resolution=resolution, on_bad_image=on_bad_image)
        build_cache(cfg, cache_model, str(out / "cache"), vae=vae, device=device)  # itself resumable by shard
        print(f"cache: {out / 'cache'} (train with data.cache_dir={out / 'cache'})")
    return out


def _write_pairs(source, path, split, filter, max_pairs, shard_size, on_bad_image, out: Path, key, resolution,
                 after_shard) -> dict:
    """Passes 1 and 2 (module docstring): plan.parquet, then the missing shards, then the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs").mkdir(exist_ok=True)
    plan_path = out / "plan.parquet"
    if plan_path.exists():  # pass 1 done in an earlier, interrupted run
        plan = pd.read_parquet(plan_path)
        stats = read_manifest(out)["stats"]
    else:
        ranks = read_rankings(source, path, split)
        keep, _, stats = orient(ranks["label_0"], ranks["label_1"], f"{path} (split {split})")
        plan = plan_pairs(ranks, filter)
        stats = {"rows": len(ranks), **stats, "decided": len(keep), "dropped_by_filter": len(keep) - len(plan)}
        if max_pairs is not None:
            stats["dropped_by_max_pairs"] = max(0, len(plan) - max_pairs)
            plan = plan.iloc[:max_pairs].reset_index(drop=True)
        if plan.empty:
            raise NcpError(f"{path} (split {split}): no pairs left after filtering ({stats}; data.filter={filter})")
        stats["planned"] = len(plan)
        _write_json(out / MANIFEST, {"key": key, "complete": False, "stats": stats})  # before the plan it describes
        plan.to_parquet(plan_path.with_suffix(".tmp"), index=False)
        os.replace(plan_path.with_suffix(".tmp"), plan_path)

    n_shards = (len(plan) + shard_size - 1) // shard_size
    shard_path = lambda k: out / "pairs" / f"pairs-{k:05d}.parquet"  # noqa: E731
    todo = [k for k in range(n_shards) if not shard_path(k).exists()]
    sample = []
    stream = open_stream(source, path, split)
    for row in stream.take(SAMPLE_ROWS):
        sample += [len(b) for c in IMAGE_COLUMNS if (b := image_bytes(row[c])) is not None]
    print(f"{'resuming, ' if len(todo) < n_shards else ''}will write {estimate(plan, sample, resolution)} "
          f"into {out} ({n_shards - len(todo)} of {n_shards} shards done)")

    if todo:
        # stream row -> [(pair index, side)] still to fill, for the shards not yet written
        need: dict[int, list[tuple[int, int, str]]] = {}
        for k in todo:
            for i in range(k * shard_size, min((k + 1) * shard_size, len(plan))):
                for side, (r, c) in enumerate(((plan.at[i, "w_row"], plan.at[i, "w_col"]),
                                               (plan.at[i, "l_row"], plan.at[i, "l_col"]))):
                    need.setdefault(int(r), []).append((i, side, c))
        last_row = max(need)
        start = min(need)
        got: dict[int, list] = {}
        missing = {k: min((k + 1) * shard_size, len(plan)) - k * shard_size for k in todo}  # pairs not yet complete
        bar = tqdm(total=sum(missing.values()), desc="pass 2: images", unit="pair")
        row = start
        for row, example in enumerate(stream.skip(start), start=start):  # skip: rows before any unfinished shard
            for i, side, col in need.get(row, ()):
                slot = got.setdefault(i, [None, None])
                slot[side] = (image_bytes(example[col]), row, col)
                if slot[0] is not None and slot[1] is not None:
                    k = i // shard_size
                    missing[k] -= 1
                    bar.update(1)
                    if missing[k] == 0:
                        _write_shard(plan, k, shard_size, got, shard_path(k), path, on_bad_image)
                        if after_shard is not None:
                            after_shard(k)
            if row >= last_row:
                break
        bar.close()
        unfinished = [k for k, n in missing.items() if n]
        if unfinished:
            raise NcpError(f"{path} (split {split}): the stream ended at row {row} before the planned rows (up to "
                           f"{last_row}); did the source change since {out / 'plan.parquet'} was written? delete {out}")

    bad, written = [], 0
    for k in range(n_shards):
        meta = pq.read_schema(shard_path(k)).metadata or {}
        bad += json.loads(meta.get(b"bad", b"[]"))
        written += pq.read_metadata(shard_path(k)).num_rows
    (out / "bad_images.txt").write_text("".join(f"{pid}\t{err}\n" for pid, err in bad))
    stats = {**stats, "bad_pairs": len(bad), "pairs": written}
    manifest = {"key": key, "complete": True, "stats": stats, "shards": n_shards}
    _write_json(out / MANIFEST, manifest)
    print(f"wrote {written} pairs ({len(bad)} dropped for bad images, see bad_images.txt) to {out / 'pairs'}; "
          f"counts: {stats}")
    return manifest


def _write_shard(plan, k, shard_size, got, path: Path, source_path, on_bad_image) -> None:
    """Pairs k*shard_size.. of the plan, each image decoded once; a bad one drops its pair (or stops)."""
    rows, bad = [], []
    for i in range(k * shard_size, min((k + 1) * shard_size, len(plan))):
        (bw, rw, cw), (bl, rl, cl) = got.pop(i)
        pid = f"{plan.at[i, 'w']}>{plan.at[i, 'l']}"
        try:
            for b, r, c in ((bw, rw, cw), (bl, rl, cl)):
                if b is None:
                    raise BadImage(f"{source_path} row {r} column {c}: no image bytes")
                open_image(b, f"{source_path} row {r} column {c}")
        except BadImage as e:
            if on_bad_image == "error":
                raise NcpError(f"pair {pid}: bad image {e}; use --on-bad-image skip to drop it") from e
            bad.append((pid, str(e)))
            continue
        rows.append((plan.at[i, "caption"], plan.at[i, "w"], plan.at[i, "l"], bw, bl))
    df = pd.DataFrame(rows, columns=["caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1"])
    df.insert(3, "label_0", 1.0)
    df.insert(4, "label_1", 0.0)
    schema = pa.schema([("caption", pa.string()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("jpg_0", pa.binary()),
                        ("jpg_1", pa.binary())], metadata={"bad": json.dumps(bad)})
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)  # small groups: training reads a pair without an Arrow copy
    os.replace(tmp, path)  # a shard exists only when complete: that is what makes resuming safe


def ensure_prepared(cfg: DataConfig) -> Path:
    """For `data.source=hub`: the prepared folder of `cfg` (streamed and filtered once; one process at a time)."""
    from filelock import FileLock

    out = Path(cfg.prepared_dir) if cfg.prepared_dir else default_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        manifest = read_manifest(out)
        if manifest is None or not manifest.get("complete"):
            print(f"data.source=hub: streaming {cfg.path} (split {cfg.split}, filter {cfg.filter}) into {out}")
        prepare("hub", cfg.path, out, cfg.split, cfg.filter, cfg.max_pairs, on_bad_image=cfg.on_bad_image)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="hub id or local dataset folder (--source hub), or parquet file/folder/glob")
    p.add_argument("--out", required=True, help="folder to write: pairs/ (train with data.source=parquet), cache/")
    p.add_argument("--source", default="hub", choices=("hub", "parquet"))
    p.add_argument("--split", default="train")
    p.add_argument("--filter", default="absolute_winners", choices=FILTERS, help="absolute_winners = the paper")
    p.add_argument("--max-pairs", type=int, default=None, help="keep the first N filtered pairs")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per output shard (the resume unit)")
    p.add_argument("--on-bad-image", default="skip", choices=("skip", "error"))
    p.add_argument("--cache-model", default=None, help="also build the latent + text cache for this model")
    p.add_argument("--resolution", type=int, default=512, help="of the cache (512 for SD1.5, 1024 for SDXL)")
    p.add_argument("--vae", default=None, help="VAE override of the cache, e.g. madebyollin/sdxl-vae-fp16-fix")
    p.add_argument("--device", default=None, help="for the cache; default cuda when available")
    a = p.parse_args(argv)
    import torch

    return prepare(a.source, a.path, a.out, a.split, a.filter, a.max_pairs, a.shard_size, a.on_bad_image,
                   a.cache_model, a.resolution, a.vae, a.device or ("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
