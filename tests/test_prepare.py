"""Streaming sources, the on-the-fly filter and `python -m ncp.data.prepare` (offline, tiny images).

A local folder in the Pick-a-Pic hub layout (`data/train-0000k-of-0000n.parquet`, as the mirrors have it)
stands in for the hub mirror; it is read through the same `load_dataset(..., streaming=True)` calls.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pandas as pd
import pytest
import torch
from PIL import Image

from ncp.data import DataConfig, build_dataloader, load_pairs
from ncp.errors import NcpError

from test_data import pickapic_frame, rankings_frame, winner_colour_ok


def png(uid: str) -> bytes:
    """A 32 px image whose colour is a function of its uid (so bytes identify the image)."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (ord(uid[0]) * 3 % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def hub_folder(tmp_path, df: pd.DataFrame, name="mirror", shards=2):
    """`df` written as a hub dataset repo: data/train-*.parquet shards plus a test split."""
    d = tmp_path / name / "data"
    d.mkdir(parents=True)
    cut = (len(df) + shards - 1) // shards
    for k in range(shards):
        df.iloc[k * cut:(k + 1) * cut].to_parquet(d / f"train-{k:05d}-of-{shards:05d}.parquet")
    df.iloc[:2].to_parquet(d / "test-00000-of-00001.parquet")
    return str(tmp_path / name)


def ranked_with_images() -> pd.DataFrame:
    df = rankings_frame()
    df["jpg_0"] = [png(u) for u in df["image_0_uid"]]
    df["jpg_1"] = [png(u) for u in df["image_1_uid"]]
    return df


@pytest.fixture
def streaming_only(monkeypatch):
    """Every datasets.load_dataset call streams: the split is never materialised, and the prepared parquet is
    read in place (no Arrow copy either)."""
    import datasets

    calls, real = [], datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(args)
        assert kwargs.get("streaming") is True, f"load_dataset without streaming: {args} {kwargs}"
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def triples(df: pd.DataFrame) -> list[tuple]:
    return list(df[["caption", "image_0_uid", "image_1_uid"]].itertuples(index=False, name=None))


@pytest.mark.parametrize("filter", ["absolute_winners", "x>y,y>z", "x>y,x>z"])
def test_streaming_filter_keeps_the_pairs_of_the_filter_command(tmp_path, streaming_only, filter):
    from ncp.data.filter import main as filter_main
    from ncp.data.prepare import prepare

    df = ranked_with_images()
    mirror = hub_folder(tmp_path, df)
    df.to_parquet(tmp_path / "rows.parquet")
    want = filter_main(["--input", str(tmp_path / "rows.parquet"), "--output", str(tmp_path / "f.parquet")]
                       + ([] if filter == "absolute_winners" else ["--mini-set", filter]))
    calls_before = len(streaming_only)
    prepare("hub", mirror, tmp_path / "out", filter=filter, shard_size=3)
    assert len(streaming_only) > calls_before  # it streamed
    got = pd.read_parquet(tmp_path / "out" / "pairs")
    assert triples(got) == triples(want) and len(got) == 4
    assert list(got["jpg_0"]) == [png(u) for u in got["image_0_uid"]]  # each image is its uid's
    assert list(got["jpg_1"]) == [png(u) for u in got["image_1_uid"]]
    stats = json.loads((tmp_path / "out" / "prepare.json").read_text())["stats"]
    assert stats["rows"] == 14 and stats["ties"] == 2 and stats["decided"] == 12 and stats["pairs"] == 4
    assert stats["dropped_by_filter"] == 8

    # the same filter on the fly over the map-style parquet source keeps the same pairs, in the same order
    pairs = load_pairs(DataConfig(source="parquet", path=str(tmp_path / "mirror" / "data"), filter=filter))
    assert list(zip(pairs.prompts, pairs.win_uids, pairs.lose_uids)) == triples(want)
    assert pairs.stats["dropped_by_filter"] == 8
    for i in range(len(pairs)):  # images follow their uid, also for derived pairs (x>z is no row of the data)
        (w, _), (l, _) = pairs.images.get(i)
        assert (w, l) == (png(pairs.win_uids[i]), png(pairs.lose_uids[i]))


def test_hub_source_streams_into_prepared_dir_and_trains_from_it(tmp_path, streaming_only):
    mirror = hub_folder(tmp_path, pickapic_frame(), shards=2)
    cfg = DataConfig(source="hub", path=mirror, resolution=16, prepared_dir=str(tmp_path / "prep"))
    pairs = load_pairs(cfg)
    assert [(p, w, l) for p, w, l in zip(pairs.prompts, pairs.win_uids, pairs.lose_uids)] == \
        [("p0", "a", "b"), ("p1", "d", "c"), ("p3", "a", "c")]
    assert pairs.stats["ties"] == 1 and pairs.stats["pairs"] == 3
    batch = next(iter(build_dataloader(cfg, batch_size=3, seed=0)))
    winner_colour_ok(batch, {i: (w, l) for i, w, l in zip(pairs.pair_ids, pairs.win_uids, pairs.lose_uids)})
    in_worker = next(iter(build_dataloader(replace(cfg, num_workers=1), batch_size=3, seed=0)))  # pickled reader
    assert in_worker["pair_id"] == batch["pair_id"] and torch.equal(in_worker["pixel_values"], batch["pixel_values"])
    n = len(streaming_only)
    load_pairs(cfg)  # prepared once: the second load does not stream again
    assert len(streaming_only) == n
    assert len(load_pairs(replace(cfg, split="test", prepared_dir=str(tmp_path / "prep-test")))) == 2
    with pytest.raises(NcpError, match="no such split.*validation"):
        load_pairs(replace(cfg, split="validation", prepared_dir=str(tmp_path / "prep-val")))
    with pytest.raises(NcpError, match="holds pairs prepared with other settings.*filter"):
        load_pairs(replace(cfg, filter="absolute_winners"))  # same folder, other settings: refused, not mixed


def test_save_to_disk_folder_streams_too(tmp_path, streaming_only):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(ranked_with_images())}).save_to_disk(str(tmp_path / "d"))
    from ncp.data.prepare import prepare

    prepare("hub", str(tmp_path / "d"), tmp_path / "out")
    assert triples(pd.read_parquet(tmp_path / "out" / "pairs")) == [("P", "A", "B"), ("P", "A", "C"),
                                                                     ("Q", "F", "H"), ("Q", "F", "G")]


def test_prepare_twice_is_a_noop(tmp_path, monkeypatch, capsys):
    from ncp.data import prepare as prep

    mirror = hub_folder(tmp_path, ranked_with_images())
    prep.main(["--path", mirror, "--out", str(tmp_path / "out"), "--shard-size", "2"])
    printed = capsys.readouterr().out
    # the count and the disk estimate come before anything is written
    assert printed.index("will write 4 pairs, 2 prompts, 6 distinct images: about") < printed.index("wrote 4 pairs")
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    monkeypatch.setattr(prep, "open_stream", lambda *a, **k: pytest.fail("a finished folder must not stream"))
    prep.main(["--path", mirror, "--out", str(tmp_path / "out"), "--shard-size", "2"])
    assert "already prepared (4 pairs); nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == files


def test_prepare_interrupted_then_rerun_gives_the_same_output(tmp_path):
    from ncp.data.prepare import prepare

    mirror = hub_folder(tmp_path, ranked_with_images(), shards=3)
    prepare("hub", mirror, tmp_path / "whole", filter="x>y,y>z", shard_size=1)

    def stop_after_two(k):
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare("hub", mirror, tmp_path / "cut", filter="x>y,y>z", shard_size=1, _after_shard=stop_after_two)
    done = sorted((tmp_path / "cut" / "pairs").glob("*.parquet"))
    assert len(done) == 2 and not json.loads((tmp_path / "cut" / "prepare.json").read_text())["complete"]
    kept = {p: p.stat().st_mtime_ns for p in done}
    written = []
    prepare("hub", mirror, tmp_path / "cut", filter="x>y,y>z", shard_size=1, _after_shard=written.append)
    assert sorted(written) == [2, 3]  # only the unfinished shards were written again
    assert {p: p.stat().st_mtime_ns for p in done} == kept
    for a, b in zip(sorted((tmp_path / "whole" / "pairs").glob("*")), sorted((tmp_path / "cut" / "pairs").glob("*"))):
        assert a.name == b.name and pd.read_parquet(a).equals(pd.read_parquet(b))
    assert (json.loads((tmp_path / "whole" / "prepare.json").read_text())
            == json.loads((tmp_path / "cut" / "prepare.json").read_text()) | {"key": json.loads(
                (tmp_path / "whole" / "prepare.json").read_text())["key"] | {"path": mirror}})


def test_prepare_bad_images_missing_columns_and_cache(tmp_path, tiny_paths):
    from ncp.data.prepare import main, prepare

    df = ranked_with_images()
    df.loc[1, "jpg_0"] = b"not an image"  # row 1 is C<A: the loser of pair A>C, read from its own row
    mirror = hub_folder(tmp_path, df)
    prepare("hub", mirror, tmp_path / "out", shard_size=2)
    out = pd.read_parquet(tmp_path / "out" / "pairs")
    assert triples(out) == [("P", "A", "B"), ("Q", "F", "H"), ("Q", "F", "G")]
    assert (tmp_path / "out" / "bad_images.txt").read_text().startswith("A>C\t")
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["stats"]["bad_pairs"] == 1
    with pytest.raises(NcpError, match=r"pair A>C: bad image .*row 1 column jpg_0"):
        prepare("hub", mirror, tmp_path / "strict", on_bad_image="error")
    hub_folder(tmp_path, df.drop(columns="label_1"), name="nolabel")
    with pytest.raises(NcpError, match=r"nolabel \(split train\): missing column 'label_1'"):
        prepare("hub", str(tmp_path / "nolabel"), tmp_path / "x")
    with pytest.raises(NcpError, match="no pairs left after filtering"):
        prepare("hub", hub_folder(tmp_path, pickapic_frame(), name="flat"), tmp_path / "y")

    # the optional latent cache of exactly these pairs; training reads it with no network
    main(["--path", mirror, "--out", str(tmp_path / "out"), "--shard-size", "2", "--cache-model",
          str(tiny_paths["sd15"]), "--resolution", "16", "--device", "cpu"])
    manifest = json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["images"] == 5  # A, B, F, H, G
    cfg = DataConfig(source="parquet", path=str(tmp_path / "out" / "pairs"), resolution=16,
                     cache_dir=str(tmp_path / "out" / "cache"))
    batch = next(iter(build_dataloader(cfg, batch_size=3, seed=0, model=str(tiny_paths["sd15"]))))
    assert batch["latents"].shape == (6, 4, 8, 8)  # the tiny VAE downsamples by 2


def test_filter_config_checked():
    with pytest.raises(NcpError, match="data.filter must be one of none, absolute_winners"):
        DataConfig(source="parquet", path="x", filter="best").validate()
    with pytest.raises(NcpError, match="data.filter='absolute_winners' needs Pick-a-Pic rankings"):
        DataConfig(filter="absolute_winners").validate()


def test_paper_configs_train_on_absolute_winners():
    from pathlib import Path

    from ncp.config import load_config

    paper = sorted(Path(__file__).parent.parent.glob("configs/sd*_*.yaml"))
    assert len(paper) == 14  # sd15 and sdxl x {ncp, latent} x {dpo, cpo, sft}, sd3 x {ncp, latent} dpo
    for path in paper:
        data = load_config(str(path)).data
        assert (data.source, data.filter) == ("hub", "absolute_winners"), path.name


def test_parquet_with_large_row_groups_is_read_through_datasets(tmp_path):
    """Shards whose row groups are big (raw Pick-a-Pic) go through datasets' Arrow cache; small ones are read in
    place (ParquetRows); both give the same pairs and bytes."""
    from ncp.data.sources import ParquetRows, _load_arrow

    df = pd.concat([ranked_with_images()] * 5, ignore_index=True)  # 70 rows in one row group
    df["image_0_uid"] = [f"{u}{i // 14}" for i, u in enumerate(df["image_0_uid"])]
    df["image_1_uid"] = [f"{u}{i // 14}" for i, u in enumerate(df["image_1_uid"])]
    df.to_parquet(tmp_path / "big.parquet")
    df.to_parquet(tmp_path / "small.parquet", row_group_size=8)
    big = DataConfig(source="parquet", path=str(tmp_path / "big.parquet"), filter="absolute_winners")
    small = replace(big, path=str(tmp_path / "small.parquet"))
    assert not isinstance(_load_arrow(big)[0], ParquetRows) and isinstance(_load_arrow(small)[0], ParquetRows)
    a, b = load_pairs(big), load_pairs(small)
    assert a.pair_ids == b.pair_ids and len(a) == 20
    assert all([src for src, _ in a.images.get(i)] == [src for src, _ in b.images.get(i)] for i in range(len(a)))


def test_processes_of_one_node_prepare_once(tmp_path, monkeypatch):
    """data.source=hub in every process of a launch: one streams and writes, the others wait on the lock."""
    import multiprocessing as mp

    from ncp.data import prepare as prep

    mirror = hub_folder(tmp_path, pickapic_frame())
    real = prep.read_rankings

    def counted(*args):
        with open(tmp_path / "passes.txt", "a") as f:
            f.write("pass 1\n")
        return real(*args)

    monkeypatch.setattr(prep, "read_rankings", counted)
    cfg = DataConfig(source="hub", path=mirror, prepared_dir=str(tmp_path / "prep"))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=load_pairs, args=(cfg,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "passes.txt").read_text() == "pass 1\n"
    assert len(load_pairs(cfg)) == 3


def test_prepare_command_errors_are_one_line(tmp_path, capsys):
    from ncp.data.prepare import main
    from ncp.errors import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--source", "parquet", "--path", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.path: no such file or folder:") and "\n" not in err


def test_runs_saved_before_data_filter_existed_still_resume():
    from ncp.config import Config, changed_keys

    now = Config().fingerprint(1)
    saved = {k: v for k, v in now.items() if k != "data.filter"}  # a checkpoint from before the key existed
    assert changed_keys(saved, now) == []
    later = Config()
    later.data.filter = "absolute_winners"
    assert changed_keys(saved, later.fingerprint(1)) == ["data.filter: 'none' -> 'absolute_winners'"]


def test_a_run_stopped_by_a_bad_image_resumes_with_skip():
    """data.on_bad_image=error stops a run at a bad image and says to set skip: the resume accepts that change, also
    from a checkpoint whose fingerprint still holds the key (saved before a resume could change it)."""
    from ncp.config import Config, changed_keys

    strict = Config()
    strict.data.on_bad_image = "error"
    saved = {**strict.fingerprint(1), "data.on_bad_image": "error"}
    assert changed_keys(strict.fingerprint(1), Config().fingerprint(1)) == []
    assert changed_keys(saved, Config().fingerprint(1)) == []
    other = Config()
    other.data.resolution = 64
    assert changed_keys(saved, other.fingerprint(1)) == ["data.resolution: 32 -> 64"]


def test_prepare_stopped_by_a_bad_image_resumes_with_skip_and_drops_an_empty_cell(tmp_path):
    """The error's advice (--on-bad-image skip) resumes the same folder, keeping the shards already written; an
    image cell with no bytes is a bad image like a corrupt one (dropped under skip), not a stop on every rerun."""
    from ncp.data.prepare import prepare

    df = ranked_with_images()
    df.loc[1, "jpg_0"] = None  # row 1 is C<A: the loser of pair A>C has no bytes
    mirror = hub_folder(tmp_path, df)
    with pytest.raises(NcpError, match=r"pair A>C: bad image .*row 1 column jpg_0: no image bytes"):
        prepare("hub", mirror, tmp_path / "out", shard_size=1, on_bad_image="error")
    written = sorted(p.name for p in (tmp_path / "out" / "pairs").glob("*.parquet"))
    assert written  # shards before the bad pair's were written
    stamps = {p: (tmp_path / "out" / "pairs" / p).stat().st_mtime_ns for p in written}
    prepare("hub", mirror, tmp_path / "out", shard_size=1, on_bad_image="skip")
    assert {p: (tmp_path / "out" / "pairs" / p).stat().st_mtime_ns for p in written} == stamps  # kept, not redone
    out = pd.read_parquet(tmp_path / "out" / "pairs")
    assert triples(out) == [("P", "A", "B"), ("Q", "F", "H"), ("Q", "F", "G")]
    assert (tmp_path / "out" / "bad_images.txt").read_text().startswith("A>C\t")
    prepare("hub", mirror, tmp_path / "fresh", shard_size=1)  # the same output as a skip run from the start
    assert triples(pd.read_parquet(tmp_path / "fresh" / "pairs")) == triples(out)


def test_prepared_folder_name_does_not_depend_on_on_bad_image():
    from ncp.data.prepare import default_dir

    cfg = DataConfig(source="hub", path="someone/pick-a-pic-v2")
    assert default_dir(cfg) == default_dir(replace(cfg, on_bad_image="error"))
