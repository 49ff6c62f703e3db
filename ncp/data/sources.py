"""Preference sources -> `Pairs`: prompts and winner-first image references, images read lazily.

Supported (`data.source`):
- hub: a hub dataset id or a local folder (`save_to_disk` output or data files) in the Pick-a-Pic
  schema (`caption, jpg_0, jpg_1, label_0, label_1, image_0_uid, image_1_uid, ...`), streamed
  (`streaming=True`, never materialised) and filtered on the fly by `ncp.data.prepare` into a local
  parquet of the kept pairs (`data.prepared_dir`), which training then reads like `parquet`;
- parquet: local Pick-a-Pic parquet shards (file, folder or glob): read in place when their row groups are
  small (`ncp.data.prepare` output), else through datasets' memory-mapped Arrow cache (a converted copy);
- pickapic_meta: Pick-a-Pic metadata without images (e.g. `pickapic_v2_no_images`) + `image_dir/<uid>.jpg`;
- authors_csv: the NCP authors' CSV (`image_0_uid, image_1_uid, label_0, caption`) + `image_dir/<uid>.jpg`;
- pairs: the user's JSONL/CSV of `prompt, chosen, rejected` image paths (relative to the file).
- toy: built-in coloured shapes (ncp.data.toy), no files.
Ties (label_0 == label_1, i.e. 0.5/0.5) are dropped and counted; pairs are turned so the winner is first.
`data.filter` (absolute_winners = the paper, or a Table 2 mini-set; ncp/data/filter.py) applies to every
source with rankings: hub, parquet, pickapic_meta, authors_csv.
"""

from __future__ import annotations

import bisect
import copy
import csv
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ncp.data.config import DataConfig
from ncp.data.toy import toy_pair
from ncp.errors import NcpError

PICKAPIC_COLUMNS = ["caption", "label_0", "label_1"]
IMAGE_COLUMNS = ["jpg_0", "jpg_1"]
UID_COLUMNS = ["image_0_uid", "image_1_uid"]
KNOWN_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")


# ---------------------------------------------------------------- image stores (picklable, for workers)
class ArrowImages:
    """Image bytes in a `datasets.Dataset` (memory-mapped Arrow), read one row at a time.
    `refs[i]` = ((row, column) of the winner, (row, column) of the loser)."""

    def __init__(self, ds, refs: list[tuple[tuple[int, str], tuple[int, str]]], origin: str):
        self.ds, self.refs, self.origin = ds.select_columns(IMAGE_COLUMNS), refs, origin

    def get(self, i: int):
        return tuple((self.ds[row][col], f"{self.origin} row {row} column {col}") for row, col in self.refs[i])


class ParquetRows:
    """Random access to the rows of parquet files with small row groups (`ncp.data.prepare` writes 8 rows each):
    a cell is read by decoding one row group's column, so no Arrow copy of the data is made (datasets'
    map-style `load_dataset("parquet")` converts it all into its cache first). Same calls as a `datasets.Dataset`
    where the loader uses them: `column_names`, `select_columns`, `to_pandas`, `ds[row]`."""

    def __init__(self, files: list[str]):
        self.files, self.column_names = files, pq.read_schema(files[0]).names
        self.columns, self.starts, self.groups, n = self.column_names, [], [], 0
        for fi, f in enumerate(files):
            meta = pq.read_metadata(f)
            for g in range(meta.num_row_groups):
                self.starts.append(n)
                self.groups.append((fi, g))
                n += meta.row_group(g).num_rows
        self.num_rows, self._open = n, {}

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # open file handles stay in their process (DataLoader workers)
        return {**self.__dict__, "_open": {}}

    def select_columns(self, columns: list[str]) -> "ParquetRows":
        view = copy.copy(self)
        view.columns, view._open = list(columns), {}
        return view

    def to_pandas(self) -> pd.DataFrame:
        frames = [pd.read_parquet(f, columns=self.columns) for f in self.files]
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def __getitem__(self, row: int) -> dict:
        k = bisect.bisect_right(self.starts, row) - 1
        fi, g = self.groups[k]
        if fi not in self._open:
            self._open[fi] = pq.ParquetFile(self.files[fi])
        table = self._open[fi].read_row_group(g, columns=self.columns)
        return {c: table.column(c)[row - self.starts[k]].as_py() for c in self.columns}


class FileImages:
    """Images as files on disk; the path is both the source and the place named in errors."""

    def __init__(self, win: list[str], lose: list[str]):
        self.win, self.lose = win, lose

    def get(self, i: int):
        return (self.win[i], self.win[i]), (self.lose[i], self.lose[i])


class ToyImages:
    """Toy pairs rendered on demand (cheaper than holding them): a pure function of (seed, index)."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def get(self, i: int):
        _, w, l = toy_pair(self.seed, i, self.size)
        return (w, f"toy pair {i} winner"), (l, f"toy pair {i} loser")


@dataclass
class Pairs:
    """Preference pairs, winner first. `images.get(i)` -> ((src_w, where_w), (src_l, where_l)),
    src being bytes, a path, an `{"bytes": ...}` dict or a PIL image; `stats` counts each step."""

    prompts: list[str]
    pair_ids: list[str]
    win_uids: list[str]
    lose_uids: list[str]
    images: object
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


# ---------------------------------------------------------------- files and tables
def resolve_files(path: str, split: str, exts: tuple[str, ...]) -> list[str]:
    """Files of `split` under a file, folder or glob. In a folder whose file names start with split
    names (Pick-a-Pic shards: `train-00000-of-00645.parquet`) only `split`'s files; else all."""
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(exts))
    elif os.path.isfile(path):
        return [path]
    else:
        raise NcpError(f"data.path: no such file or folder: {path}")
    if not files:
        raise NcpError(f"data.path: no {'/'.join(exts)} files in {path}")

    root = path if os.path.isdir(path) else os.path.dirname(re.split(r"[*?\[]", path)[0])  # a glob: above its wildcards

    def split_of(f: str) -> str | None:  # the file's name, or a folder between data.path and the file
        for part in [os.path.basename(f)] + list(Path(os.path.relpath(f, root or ".")).parent.parts):
            for s in KNOWN_SPLITS:
                if re.match(rf"^{s}(-|\.|$)", part):
                    return s
        return None

    splits = {split_of(f) for f in files}
    if splits == {None}:
        return files
    chosen = [f for f in files if split_of(f) == split]
    if not chosen:
        raise NcpError(f"data.split={split!r}: no such split in {path} (found {sorted(s for s in splits if s)})")
    return chosen


def read_table(files: list[str], columns: list[str], optional: list[str] = ()) -> pd.DataFrame:
    """Read parquet / CSV / JSONL files into one frame with `columns` (required) and `optional` ones.
    An unreadable file or a missing column raises NcpError naming both."""
    frames = []
    for f in files:
        try:
            if f.endswith(".parquet"):
                have = pq.read_schema(f).names
                missing = [c for c in columns if c not in have]
                if missing:
                    raise NcpError(f"{f}: missing column {missing[0]!r} (has {have})")
                df = pd.read_parquet(f, columns=[c for c in columns + list(optional) if c in have])
            elif f.endswith((".jsonl", ".json")):
                df = pd.read_json(f, lines=True)
            else:
                df = pd.read_csv(f)
        except NcpError:
            raise
        except Exception as e:  # pyarrow / pandas raise many types for a bad file
            raise NcpError(f"{f}: cannot read ({type(e).__name__}: {e}){_bad_json_line(f)}") from e
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise NcpError(f"{f}: missing column {missing[0]!r} (has {list(df.columns)})")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _bad_json_line(path: str) -> str:
    """'; line N is not JSON' for the first such line of a JSONL file (pandas names a character position)."""
    if not path.endswith((".jsonl", ".json")) or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                line.strip() and json.loads(line)
            except ValueError:
                return f"; line {n} is not JSON"
    return ""


def record_lines(path: str) -> list[int]:
    """The 1-based line where each record of a CSV (after its header) or JSONL file starts, as pandas reads them:
    blank lines skipped, a quoted CSV field may span lines."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        if path.endswith((".jsonl", ".json")):
            return [n for n, line in enumerate(fh, start=1) if line.strip()]
        reader, starts, end = csv.reader(fh), [], 0
        for row in reader:
            if row and not (len(row) == 1 and not row[0].strip()):  # pandas skips blank lines, not ",,"
                starts.append(end + 1)
            end = reader.line_num
        return starts[1:]


def orient(label_0, label_1, where: str = "data") -> tuple[np.ndarray, np.ndarray, dict]:
    """Rows to keep and whether to swap them so the winner is image 0. Ties (equal labels, Pick-a-Pic's
    0.5/0.5) and rows without labels are dropped and counted; a label that is not a number names its row."""
    l0, l1 = _numbers(label_0, "label_0", where), _numbers(label_1, "label_1", where)
    unlabelled = np.isnan(l0) | np.isnan(l1)
    tie = ~unlabelled & (l0 == l1)
    keep = np.flatnonzero(~unlabelled & ~tie)
    return keep, l1[keep] > l0[keep], {"ties": int(tie.sum()), "unlabelled": int(unlabelled.sum())}


def _numbers(values, column: str, where: str) -> np.ndarray:
    """A label column as floats; a cell that holds something other than a number is an error naming its row."""
    cells = pd.Series(values).reset_index(drop=True)
    numbers = pd.to_numeric(cells, errors="coerce")
    bad = np.flatnonzero((numbers.isna() & cells.notna()).to_numpy())
    if len(bad):
        raise NcpError(f"{where} row {bad[0]}: {column} {cells[bad[0]]!r} is not a number ({len(bad)} such rows)")
    return numbers.to_numpy(dtype=np.float64)


def _finish(prompts, ids, wu, lu, images, stats, where: str, max_pairs: int | None) -> Pairs:
    """Apply max_pairs and refuse an empty result with the count each step removed."""
    if max_pairs is not None:
        stats["dropped_by_max_pairs"] = max(0, len(prompts) - max_pairs)
        prompts, ids, wu, lu = prompts[:max_pairs], ids[:max_pairs], wu[:max_pairs], lu[:max_pairs]
    stats["pairs"] = len(prompts)
    if not prompts:
        steps = ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("pairs",))
        raise NcpError(f"{where}: no pairs left after filtering ({steps}; removed: ties = 0.5/0.5 labels, "
                       "unlabelled = missing labels)")
    return Pairs(list(prompts), list(ids), list(wu), list(lu), images, stats)


def _labelled(df: pd.DataFrame, where: str, max_pairs, filter: str = "none", row_names=None):
    """Keep/orient rows of a Pick-a-Pic-like frame (and apply `data.filter`); returns prompts, ids, uids,
    image refs ((row, column) of winner and loser in `df`) and stats. Without uid columns an image is named
    `<row name>_<side>` (`row_names`, default `row<r>`)."""
    keep, swap, stats = orient(df["label_0"], df["label_1"], where)
    stats = {"rows": len(df), **stats}
    if filter != "none":
        from ncp.data.filter import NEEDED, plan_pairs

        missing = [c for c in NEEDED if c not in df.columns]
        if missing:
            raise NcpError(f"{where}: data.filter={filter} needs column {missing[0]!r} (has {list(df.columns)})")
        plan = plan_pairs(df, filter)
        stats["dropped_by_filter"] = len(keep) - len(plan)
        if max_pairs is not None:
            stats["dropped_by_max_pairs"] = max(0, len(plan) - max_pairs)
            plan = plan.iloc[:max_pairs]
        wu, lu = plan["w"].tolist(), plan["l"].tolist()
        refs = list(zip(zip(plan["w_row"].tolist(), plan["w_col"]), zip(plan["l_row"].tolist(), plan["l_col"])))
        return plan["caption"].tolist(), [f"{w}>{l}" for w, l in zip(wu, lu)], wu, lu, refs, stats
    if max_pairs is not None:  # cut before building per-pair lists: cheap on 1M rows
        stats["dropped_by_max_pairs"] = max(0, len(keep) - max_pairs)
        keep, swap = keep[:max_pairs], swap[:max_pairs]
    caps = df["caption"].fillna("").astype(str).to_numpy()[keep]
    if all(c in df.columns for c in UID_COLUMNS):
        u0 = df["image_0_uid"].astype(str).to_numpy()[keep]
        u1 = df["image_1_uid"].astype(str).to_numpy()[keep]
    else:  # no uids: name images by row, so reports and the cache still have a key
        name = (lambda r: f"row{r}") if row_names is None else row_names.__getitem__  # noqa: E731
        u0 = np.array([f"{name(r)}_0" for r in keep])
        u1 = np.array([f"{name(r)}_1" for r in keep])
    wu, lu = np.where(swap, u1, u0).tolist(), np.where(swap, u0, u1).tolist()
    ids = [f"{w}>{l}" for w, l in zip(wu, lu)]
    refs = [((r, "jpg_1"), (r, "jpg_0")) if s else ((r, "jpg_0"), (r, "jpg_1")) for r, s in zip(keep.tolist(), swap.tolist())]
    return caps.tolist(), ids, wu, lu, refs, stats


# ---------------------------------------------------------------- sources
SMALL_ROW_GROUP = 64  # rows; up to this, reading one image straight from the parquet is cheap


def _load_arrow(cfg: DataConfig):
    """Local parquet shards as rows with random access, plus a name for messages: read in place when their row
    groups are small (prepared data), else a memory-mapped `datasets.Dataset` (an Arrow copy in its cache)."""
    import datasets

    files = resolve_files(cfg.path, cfg.split, (".parquet",))
    schemas = [_check_parquet(f) for f in files]  # a bad shard or column fails here, naming the file, not in datasets
    read = PICKAPIC_COLUMNS + IMAGE_COLUMNS + UID_COLUMNS + ["ranking_id"]
    used = lambda s: {c for c in read if c in s.names}  # noqa: E731
    for f, schema in zip(files[1:], schemas[1:]):
        if used(schema) != used(schemas[0]):
            raise NcpError(f"{f}: its columns differ from {files[0]}'s (only there: {sorted(used(schemas[0]) - used(schema))}"
                           f", only here: {sorted(used(schema) - used(schemas[0]))}); the shards of one data.path must "
                           "share their columns")
    metas = [pq.read_metadata(f) for f in files]
    if all(m.row_group(g).num_rows <= SMALL_ROW_GROUP for m in metas for g in range(m.num_row_groups)):
        return ParquetRows(files), cfg.path, metas
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train"), cfg.path, metas
    except Exception as e:
        raise NcpError(f"{cfg.path}: cannot load parquet split {cfg.split!r} ({type(e).__name__}: {e})") from e


def content_rows(metas: list) -> list[str]:
    """Names for the rows of parquet files without uids, `<file tag>:<row in file>`, the tag a hash of the file's
    footer (row groups, their sizes and statistics): other data does not match a latent cache's images by row."""
    names = []
    for m in metas:
        tag = hashlib.sha1(json.dumps(m.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        names += [f"{tag}:{r}" for r in range(m.num_rows)]
    return names


def _check_parquet(f: str):
    """The shard's schema; an unreadable shard or a missing column names the file."""
    try:
        schema = pq.read_schema(f)
    except Exception as e:
        raise NcpError(f"{f}: cannot read ({type(e).__name__}: {e})") from e
    for c in PICKAPIC_COLUMNS + IMAGE_COLUMNS:
        if c not in schema.names:
            raise NcpError(f"{f}: missing column {c!r} (has {schema.names})")
    return schema


def load_pairs(cfg: DataConfig) -> Pairs:
    """Read the configured source into winner-first `Pairs` (images not decoded yet)."""
    cfg.validate()
    if cfg.source == "toy":
        caps = [toy_pair(cfg.toy_seed, i, 8)[0] for i in range(cfg.toy_num_pairs)]  # caption only; 8 px is cheap
        n = len(caps) if cfg.max_pairs is None else min(cfg.max_pairs, len(caps))
        ids = [f"toy{cfg.toy_seed}-{i}" for i in range(n)]
        return Pairs(caps[:n], ids, [f"{p}w" for p in ids], [f"{p}l" for p in ids],
                     ToyImages(cfg.toy_seed, cfg.resolution), {"rows": cfg.toy_num_pairs, "pairs": n})

    if cfg.source == "hub":  # streamed (filtered on the fly) into a local parquet once, then read from there
        from ncp.data.prepare import ensure_prepared

        local = ensure_prepared(cfg)
        pairs = load_pairs(replace(cfg, source="parquet", path=str(local / "pairs"), split="train", filter="none"))
        pairs.stats = {**json.loads((local / "prepare.json").read_text())["stats"], "pairs": len(pairs)}
        return pairs

    if cfg.source == "parquet":
        ds, where, metas = _load_arrow(cfg)
        missing = [c for c in PICKAPIC_COLUMNS + IMAGE_COLUMNS if c not in ds.column_names]
        if missing:
            raise NcpError(f"{where} (split {cfg.split}): missing column {missing[0]!r} (has {ds.column_names})")
        meta = ds.select_columns(PICKAPIC_COLUMNS + [c for c in UID_COLUMNS + ["ranking_id"]
                                                     if c in ds.column_names]).to_pandas()
        rows = None if all(c in meta.columns for c in UID_COLUMNS) else content_rows(metas)
        caps, ids, wu, lu, refs, stats = _labelled(meta, where, cfg.max_pairs, cfg.filter, rows)
        return _finish(caps, ids, wu, lu, ArrowImages(ds, refs, where), stats, where, None)

    if cfg.source == "pickapic_meta":
        files = resolve_files(cfg.path, cfg.split, (".parquet",))
        df = read_table(files, PICKAPIC_COLUMNS + UID_COLUMNS, optional=["ranking_id"])
    elif cfg.source == "authors_csv":
        files = [cfg.path]
        df = read_table(files, ["image_0_uid", "image_1_uid", "label_0", "caption"], optional=["ranking_id"])
        df["label_1"] = 1.0 - _numbers(df["label_0"], "label_0", cfg.path)  # the CSV stores label_0 only
    else:  # pairs
        return _load_user_pairs(cfg)

    caps, ids, wu, lu, _, stats = _labelled(df, cfg.path, cfg.max_pairs, cfg.filter)
    to_path = lambda uid: os.path.join(cfg.image_dir, f"{uid}.jpg")  # noqa: E731  (Pick-a-Pic names files by uid)
    images = FileImages([to_path(u) for u in wu], [to_path(u) for u in lu])
    return _finish(caps, ids, wu, lu, images, stats, cfg.path, None)


def _load_user_pairs(cfg: DataConfig) -> Pairs:
    """JSONL/CSV of `prompt, chosen, rejected` (chosen = winner). Relative paths are relative to the file.
    Pairs are named `<file>:<line>` (1-based line of the file, the CSV header being line 1) unless an `id`
    column names them; the summary counts empty path cells and paths whose file does not exist."""
    df = read_table([cfg.path], ["prompt", "chosen", "rejected"])
    base = os.path.dirname(os.path.abspath(cfg.path))
    stats = {"rows": len(df)}
    ok = df["chosen"].notna() & df["rejected"].notna()
    stats["empty_paths"] = int((~ok).sum())
    lines = record_lines(cfg.path)
    if len(lines) != len(df):  # a file pandas reads otherwise than above: number its records instead
        lines = [f"record {i + 1}" for i in range(len(df))]
    df = df[ok]
    full = lambda p: os.path.normpath(os.path.join(base, str(p)))  # noqa: E731  (absolute p wins in join)
    win, lose = [full(p) for p in df["chosen"]], [full(p) for p in df["rejected"]]
    stats["missing_files"] = sum(not os.path.exists(w) or not os.path.exists(l) for w, l in zip(win, lose))
    name = Path(cfg.path).name
    ids = df["id"].astype(str).tolist() if "id" in df.columns else [f"{name}:{lines[i]}" for i in df.index]
    prompts = df["prompt"].fillna("").astype(str).tolist()
    return _finish(prompts, ids, win, lose, FileImages(win, lose), stats, cfg.path, cfg.max_pairs)
