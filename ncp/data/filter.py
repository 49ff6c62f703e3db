"""The paper's data filtering (NCP paper, section 5): absolute winners and the Table 2 mini-sets.

An absolute winner is an image with 0 losses, 0 draws (ties) and more than 1 win among the pairs of its
prompt. The filtered set is every pair such an image won, winner first (paper: 851,293 pairs / 58,960
prompts -> 87,687 / 53,701 on the Pick-a-Pic v2 train split). Mini-sets (Table 2), with "latest" =
highest `ranking_id` (row order when the column is absent):
  x>y      each absolute winner x against its latest loser y;
  x>y,y>z  plus each such y against its own latest loser z;
  x>y,x>z  plus x against that same z (x beat y, y beat z: the winner stays absolute).

    python -m ncp.data.filter --input pickapic_v2_no_images/data --output filtered.parquet [--mini-set x>y]

Run it on the metadata (no images) for the full set; image columns `jpg_0, jpg_1`, when present, are
carried into the output (held in memory). The output is in the Pick-a-Pic schema with label_0 = 1, so
it loads as `data.source=pickapic_meta` (or `parquet` with images).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from ncp.data.config import FILTERS, MINI_SETS
from ncp.data.sources import IMAGE_COLUMNS, read_table, resolve_files
from ncp.errors import NcpError, run_cli

NEEDED = ["caption", "image_0_uid", "image_1_uid", "label_0"]


def _oriented(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(decided pairs as caption, w, l, row, order, winner first; ties) of a Pick-a-Pic frame."""
    l0 = pd.to_numeric(df["label_0"], errors="coerce").to_numpy(dtype=float)
    l1 = (pd.to_numeric(df["label_1"], errors="coerce").to_numpy(dtype=float) if "label_1" in df
          else 1.0 - l0)  # the authors' CSV has label_0 only
    order = df["ranking_id"].to_numpy() if "ranking_id" in df else np.arange(len(df))
    u0, u1 = df["image_0_uid"].astype(str).to_numpy(), df["image_1_uid"].astype(str).to_numpy()
    swap = l1 > l0
    frame = pd.DataFrame({"caption": df["caption"].astype(str).to_numpy(), "w": np.where(swap, u1, u0),
                          "l": np.where(swap, u0, u1), "row": np.arange(len(df)), "order": order})
    tie = l0 == l1
    return frame[~tie & ~np.isnan(l0) & ~np.isnan(l1)], frame[tie]


def absolute_winners(pairs: pd.DataFrame, ties: pd.DataFrame) -> set[tuple[str, str]]:
    """(caption, uid) of images with more than 1 win, no loss and no draw among their prompt's pairs."""
    wins = pairs.groupby(["caption", "w"]).size()
    beaten = set(zip(pairs["caption"], pairs["l"]))
    drawn = set(zip(ties["caption"], ties["w"])) | set(zip(ties["caption"], ties["l"]))
    return {key for key, n in wins.items() if n > 1 and key not in beaten and key not in drawn}


def filter_pairs(df: pd.DataFrame, mini_set: str | None = None) -> pd.DataFrame:
    """Filtered pairs, winner first: columns caption, image_0_uid (winner), image_1_uid, label_0 = 1, label_1 = 0,
    plus `jpg_0, jpg_1` when the input has them. Pairs that were rows keep their source row's order."""
    if mini_set is not None and mini_set not in MINI_SETS:
        raise NcpError(f"--mini-set must be one of {', '.join(MINI_SETS)}; got {mini_set!r}")
    pairs, ties = _oriented(df)
    best = absolute_winners(pairs, ties)
    is_best = [k in best for k in zip(pairs["caption"], pairs["w"])]
    if mini_set is None:
        out = [(c, w, l) for c, w, l in pairs.loc[is_best, ["caption", "w", "l"]].itertuples(index=False)]
    else:
        # latest loser of every winning image: the last of its wins by (ranking_id, row)
        latest = pairs.sort_values(["order", "row"]).groupby(["caption", "w"])["l"].last().to_dict()
        first_row = pairs.groupby(["caption", "w"])["row"].min().to_dict()
        out = []
        for c, x in sorted(best, key=first_row.get):  # in order of first appearance: deterministic output
            y = latest[(c, x)]
            out.append((c, x, y))
            z = latest.get((c, y))
            if z is not None and mini_set != "x>y":
                out.append((c, y, z) if mini_set == "x>y,y>z" else (c, x, z))
    res = pd.DataFrame(out, columns=["caption", "image_0_uid", "image_1_uid"])
    res["label_0"], res["label_1"] = 1.0, 0.0
    if all(c in df for c in IMAGE_COLUMNS):  # carry image bytes: any row that shows the uid has them
        where = {}
        for col, ucol in (("jpg_1", "image_1_uid"), ("jpg_0", "image_0_uid")):
            where.update({u: (i, col) for i, u in enumerate(df[ucol].astype(str))})
        for col, ucol in zip(IMAGE_COLUMNS, ("image_0_uid", "image_1_uid")):
            res[col] = [df[where[u][1]].iloc[where[u][0]] for u in res[ucol]]
    return res


def plan_pairs(df: pd.DataFrame, filter: str) -> pd.DataFrame:
    """The pairs `data.filter` keeps, winner first, and where each image's bytes are in `df`.

    Columns: caption, w, l (uids), w_row, w_col, l_row, l_col (row of `df` and "jpg_0"/"jpg_1"). A pair that
    is a row of `df` takes both images from that row; a derived pair (mini-set x>z) from the first row
    showing each uid. `none` keeps every decided pair; the others are `filter_pairs` (same pairs, same order)."""
    if filter not in FILTERS:
        raise NcpError(f"data.filter must be one of {', '.join(FILTERS)}; got {filter!r}")
    pairs, _ = _oriented(df)
    swapped = pairs["w"].to_numpy() != df["image_0_uid"].astype(str).to_numpy()[pairs["row"].to_numpy()]
    if filter == "none":
        rows = pairs["row"].to_numpy()
        return pd.DataFrame({"caption": pairs["caption"].to_numpy(), "w": pairs["w"].to_numpy(), "l": pairs["l"].to_numpy(),
                             "w_row": rows, "w_col": np.where(swapped, "jpg_1", "jpg_0"),
                             "l_row": rows, "l_col": np.where(swapped, "jpg_0", "jpg_1")})
    kept = filter_pairs(df[NEEDED + [c for c in ("label_1", "ranking_id") if c in df]],
                        None if filter == "absolute_winners" else filter)
    own = {}  # (caption, w, l) -> first row showing that pair, and whether the winner is image 1 there
    for key, row, sw in zip(zip(pairs["caption"], pairs["w"], pairs["l"]), pairs["row"], swapped):
        own.setdefault(key, (int(row), bool(sw)))
    first = {}  # uid -> first (row, column) showing it
    for col, ucol in (("jpg_0", "image_0_uid"), ("jpg_1", "image_1_uid")):
        for row, u in enumerate(df[ucol].astype(str)):
            if u not in first or row < first[u][0]:
                first[u] = (row, col)
    out = []
    for c, w, l in kept[["caption", "image_0_uid", "image_1_uid"]].itertuples(index=False):
        if (c, w, l) in own:
            row, sw = own[(c, w, l)]
            out.append((c, w, l, row, "jpg_1" if sw else "jpg_0", row, "jpg_0" if sw else "jpg_1"))
        else:
            out.append((c, w, l, *first[w], *first[l]))
    return pd.DataFrame(out, columns=["caption", "w", "l", "w_row", "w_col", "l_row", "l_col"])


def summary(df: pd.DataFrame) -> dict:
    """Decided pairs, prompts with a decided pair, and ties of a Pick-a-Pic-like frame."""
    pairs, ties = _oriented(df)
    return {"pairs": len(pairs), "prompts": pairs["caption"].nunique(), "ties": len(ties)}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="Pick-a-Pic parquet file/folder/glob, or the authors' CSV")
    p.add_argument("--output", required=True, help="parquet file to write")
    p.add_argument("--split", default="train", help="split to read from a folder of Pick-a-Pic shards")
    p.add_argument("--mini-set", default=None, choices=MINI_SETS, help="Table 2 mini-set instead of all pairs")
    args = p.parse_args(argv)
    try:
        files = resolve_files(args.input, args.split, (".parquet", ".csv"))
        df = read_table(files, NEEDED, optional=["label_1", "ranking_id", *IMAGE_COLUMNS])
        before = summary(df)
        out = filter_pairs(df, args.mini_set)
        print(f"before: {before['pairs']} pairs, {before['prompts']} prompts ({before['ties']} ties dropped)")
        if out.empty:
            raise NcpError(f"{args.input}: the absolute-winner filter removed all {before['pairs']} pairs "
                           "(no image has more than 1 win with 0 losses and 0 draws for its prompt)")
        print(f"after ({args.mini_set or 'absolute winners'}): {len(out)} pairs, "
              f"{out['caption'].nunique()} prompts")
    except NcpError as e:
        raise SystemExit(f"error: {e}")
    out.to_parquet(args.output, index=False)
    print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
