"""Tests of the preference-data layer (ncp.data): sources, pairs, loader, filter, toy data, cache.

All fixtures are written into tmp_path; nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ncp.data import DataConfig, build_dataloader, load_pairs, read_bad_pair_ids, toy_prompts, toy_reward
from ncp.data.loader import PairDataset, pair_transform
from ncp.data.toy import render, toy_pair
from ncp.errors import NcpError


# ---------------------------------------------------------------- fixtures
def solid(colour, size=(40, 24)) -> Image.Image:
    """A plain image whose colour tells which uid it is (width 40, height 24 by default)."""
    return Image.new("RGB", size, colour)


def jpg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless, so pixel checks are exact; PIL sniffs the format, not the name
    return buf.getvalue()


# image uid -> colour; the winner of each row below is always the reddest
COLOURS = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250), "d": (200, 0, 0), "e": (0, 100, 0), "f": (0, 0, 100)}
# (caption, uid0, uid1, label_0, label_1): row 1 is turned (winner second), row 2 a tie
ROWS = [("p0", "a", "b", 1.0, 0.0), ("p1", "c", "d", 0.0, 1.0), ("p2", "e", "f", 0.5, 0.5), ("p3", "a", "c", 1.0, 0.0)]
WINNERS = [("p0", "a", "b"), ("p1", "d", "c"), ("p3", "a", "c")]


def pickapic_frame(with_images=True) -> pd.DataFrame:
    df = pd.DataFrame(ROWS, columns=["caption", "image_0_uid", "image_1_uid", "label_0", "label_1"])
    if with_images:
        df["jpg_0"] = [jpg_bytes(solid(COLOURS[u])) for u in df["image_0_uid"]]
        df["jpg_1"] = [jpg_bytes(solid(COLOURS[u])) for u in df["image_1_uid"]]
    return df


def image_dir(tmp_path) -> str:
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    for uid, c in COLOURS.items():
        solid(c).save(d / f"{uid}.jpg", format="PNG")
    return str(d)


def winner_colour_ok(batch, pairs_by_id):
    """Each winner / loser image of the batch has the colour of the expected uid."""
    b = len(batch["prompts"])
    for i, pid in enumerate(batch["pair_id"]):
        w, l = pairs_by_id[pid]
        for img, uid in ((batch["pixel_values"][i], w), (batch["pixel_values"][b + i], l)):
            want = torch.tensor(COLOURS[uid], dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(img.mean(dim=(1, 2)), want, atol=0.02), (pid, uid)


def check_source(cfg: DataConfig):
    """Load every pair of a Pick-a-Pic-like fixture and check ties, orientation and pixels."""
    pairs = load_pairs(cfg)
    assert pairs.stats["ties"] == 1
    assert [(p, w, l) for p, w, l in zip(pairs.prompts, pairs.win_uids, pairs.lose_uids)] == WINNERS
    batch = next(iter(build_dataloader(cfg, batch_size=3, seed=0)))
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    assert batch["original_size"].tolist() == [[24, 40]] * 6  # (height, width) before resize
    winner_colour_ok(batch, {i: (w, l) for i, w, l in zip(pairs.pair_ids, pairs.win_uids, pairs.lose_uids)})


# ---------------------------------------------------------------- config
def test_config_validate_names_key():
    DataConfig().validate()
    with pytest.raises(NcpError, match="data.crop must be one of"):
        DataConfig(crop="middle").validate()
    with pytest.raises(NcpError, match="data.path is required"):
        DataConfig(source="parquet").validate()
    with pytest.raises(NcpError, match="data.image_dir"):
        DataConfig(source="authors_csv", path="x.csv").validate()
    with pytest.raises(NcpError, match="data.proportion_empty_prompts"):
        DataConfig(proportion_empty_prompts=1.5).validate()


# ---------------------------------------------------------------- toy data
def test_toy_winner_beats_loser_and_reward_reads_tensors():
    for i in range(300):
        caption, w, l = toy_pair(seed=3, index=i)
        assert toy_reward(w, caption) == 1.0
        assert toy_reward(l, caption) < 1.0
    caption, w, l = toy_pair(seed=3, index=0)
    # the loader's tensor in [-1, 1] scores the same as the PIL image
    t = torch.from_numpy(np.array(l)).permute(2, 0, 1).float() / 127.5 - 1
    assert toy_reward(t, caption) == pytest.approx(toy_reward(l, caption), abs=1e-6)
    assert toy_reward(render("red", "circle", "white"), "a blue circle on a white background") < 1.0
    with pytest.raises(NcpError, match="not a toy caption"):
        toy_reward(w, "a cat")
    assert toy_prompts(5, seed=1) == toy_prompts(5, seed=1) != toy_prompts(5, seed=2)
    assert toy_pair(3, 7)[0] == toy_pair(3, 7)[0] and np.array_equal(toy_pair(3, 7)[2], toy_pair(3, 7)[2])


def test_toy_loader_batch_format_and_determinism():
    cfg = DataConfig(toy_num_pairs=16, crop="random", random_flip=True, proportion_empty_prompts=0.5)
    batches = [next(iter(build_dataloader(cfg, batch_size=4, seed=1))) for _ in range(2)]
    b = batches[0]
    assert b["pixel_values"].shape == (8, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1
    assert b["original_size"].shape == (8, 2) and b["crop_top_left"].dtype == torch.long
    assert len(b["prompts"]) == len(b["pair_id"]) == 4
    assert b["pair_id"] == batches[1]["pair_id"] and torch.equal(b["pixel_values"], batches[1]["pixel_values"])
    # winners first: each winner follows its (non-dropped) prompt better than its loser
    for i, p in enumerate(b["prompts"]):
        if p:
            assert toy_reward(b["pixel_values"][i], p) > toy_reward(b["pixel_values"][4 + i], p)


def test_per_item_randomness_ignores_workers_and_global_rng():
    cfg = DataConfig(toy_num_pairs=12, crop="random", random_flip=True, proportion_empty_prompts=0.5, resolution=16)
    runs = []
    for workers in (0, 2):
        torch.manual_seed(workers)
        cfg.num_workers = workers
        loader = build_dataloader(cfg, batch_size=4, seed=5)
        loader.dataset.set_epoch(1)
        runs.append([(b["pair_id"], b["prompts"], b["pixel_values"]) for b in loader])
    for (ids0, p0, x0), (ids1, p1, x1) in zip(*runs):
        assert ids0 == ids1 and p0 == p1 and torch.equal(x0, x1)
    loader.dataset.set_epoch(2)
    assert [b["pair_id"] for b in loader] != [r[0] for r in runs[1]]  # a new epoch reshuffles
    # roughly half the prompts dropped over all 12 pairs
    n_empty = sum(p == "" for r in runs[0] for p in r[1])
    assert 1 <= n_empty <= 11


# ---------------------------------------------------------------- sources
def test_parquet_source_split_ties_orientation(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    pickapic_frame().to_parquet(d / "train-00000-of-00001.parquet")
    pickapic_frame().iloc[:1].to_parquet(d / "test-00000-of-00001.parquet")
    check_source(DataConfig(source="parquet", path=str(d), resolution=16))
    assert len(load_pairs(DataConfig(source="parquet", path=str(d), split="test"))) == 1
    assert len(load_pairs(DataConfig(source="parquet", path=str(d / "train-*.parquet"), max_pairs=2))) == 2
    with pytest.raises(NcpError, match="no such split.*'test', 'train'"):
        load_pairs(DataConfig(source="parquet", path=str(d), split="validation"))


def test_hub_source_from_save_to_disk_folder(tmp_path):
    import datasets

    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(pickapic_frame())})
    dsd.save_to_disk(str(tmp_path / "pick"))
    # streamed into a local parquet (ncp.data.prepare), then read map-style from there
    check_source(DataConfig(source="hub", path=str(tmp_path / "pick"), resolution=16,
                            prepared_dir=str(tmp_path / "prepared")))
    assert (tmp_path / "prepared" / "pairs" / "pairs-00000.parquet").exists()
    with pytest.raises(NcpError, match="no such split"):
        load_pairs(DataConfig(source="hub", path=str(tmp_path / "pick"), split="test",
                              prepared_dir=str(tmp_path / "prepared-test")))


def test_pickapic_meta_and_authors_csv_with_image_dir(tmp_path):
    images = image_dir(tmp_path)
    pickapic_frame(with_images=False).to_parquet(tmp_path / "meta.parquet")
    check_source(DataConfig(source="pickapic_meta", path=str(tmp_path / "meta.parquet"), image_dir=images,
                            resolution=16))
    pickapic_frame(with_images=False).drop(columns="label_1").to_csv(tmp_path / "authors.csv", index=False)
    check_source(DataConfig(source="authors_csv", path=str(tmp_path / "authors.csv"), image_dir=images,
                            resolution=16))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_user_pairs_paths_relative_to_file(tmp_path, fmt):
    image_dir(tmp_path)
    rows = [{"prompt": p, "chosen": f"images/{w}.jpg", "rejected": f"images/{l}.jpg"} for p, w, l in WINNERS]
    rows[1]["chosen"] = str(tmp_path / "images" / "d.jpg")  # absolute paths work too
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    cfg = DataConfig(source="pairs", path=str(path), resolution=16)
    pairs = load_pairs(cfg)
    assert pairs.prompts == ["p0", "p1", "p3"]
    batch = next(iter(build_dataloader(cfg, batch_size=3, seed=0)))
    winner_colour_ok(batch, {pid: (w, l) for pid, (_, w, l) in zip(pairs.pair_ids, WINNERS)})

    # pairs are named by the 1-based line of the file (the CSV header is line 1); a missing file is counted
    # as missing in the summary and reported, with that line, when the loader skips it
    os.remove(tmp_path / "images" / "b.jpg")
    first = 1 if fmt == "jsonl" else 2
    pairs = load_pairs(cfg)
    assert pairs.pair_ids == [f"pairs.{fmt}:{first + i}" for i in range(3)]
    assert pairs.stats == {"rows": 3, "empty_paths": 0, "missing_files": 1, "pairs": 3}
    out = tmp_path / "run"
    list(build_dataloader(cfg, batch_size=1, seed=0, output_dir=str(out)))
    assert (out / "bad_images.txt").read_text().startswith(f"pairs.{fmt}:{first}\t")


# ---------------------------------------------------------------- transforms
def test_pair_gets_identical_crop_and_flip():
    """Two copies of one asymmetric image stay equal after random crop + flip; a crop moves over epochs."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    seen = set()
    for k in range(8):
        (w, l), sizes, corners = pair_transform([img, img.copy()], 16, u=k / 8, v=(7 - k) / 8, flip=k % 2 == 1)
        assert torch.equal(w, l) and corners[0] == corners[1] and sizes == [(30, 50)] * 2
        seen.add(tuple(corners[0]))
    assert len(seen) > 4
    (c,), _, (tl,) = pair_transform([img], 16, u=0.5, v=0.5, flip=False)
    assert tl == (0, round(0.5 * (round(50 * 16 / 30) - 16)))  # resized to 27x16, centred: left = 6 (hand maths)
    assert tl == (0, 6)


# ---------------------------------------------------------------- bad input
def test_missing_column_and_unreadable_file_name_file_and_column(tmp_path):
    pickapic_frame().drop(columns="label_1").to_parquet(tmp_path / "train-0.parquet")
    with pytest.raises(NcpError, match=r"train-0.parquet: missing column 'label_1'"):
        load_pairs(DataConfig(source="parquet", path=str(tmp_path / "train-0.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(NcpError, match=r"bad.parquet: cannot read"):
        load_pairs(DataConfig(source="pickapic_meta", path=str(tmp_path / "bad.parquet"), image_dir="x"))
    with pytest.raises(NcpError, match=r"bad.parquet: cannot read"):
        load_pairs(DataConfig(source="parquet", path=str(tmp_path / "bad.parquet")))
    pd.DataFrame({"prompt": ["x"], "chosen": ["a.jpg"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(NcpError, match=r"p.csv: missing column 'rejected'"):
        load_pairs(DataConfig(source="pairs", path=str(tmp_path / "p.csv")))
    with pytest.raises(NcpError, match="nope.jsonl: cannot read.*No such file"):
        load_pairs(DataConfig(source="pairs", path=str(tmp_path / "nope.jsonl")))


def test_everything_filtered_says_what_removed_it(tmp_path):
    df = pickapic_frame(with_images=False)
    df["label_0"] = df["label_1"] = 0.5
    df.to_parquet(tmp_path / "meta.parquet")
    with pytest.raises(NcpError, match=r"no pairs left.*rows 4, ties 4"):
        load_pairs(DataConfig(source="pickapic_meta", path=str(tmp_path / "meta.parquet"), image_dir="x"))


def test_bad_images_skipped_and_reported_or_error(tmp_path):
    images = image_dir(tmp_path)
    (tmp_path / "images" / "b.jpg").write_bytes(b"\xff\xd8 truncated jpeg")  # corrupt: pair a>b is bad
    pickapic_frame(with_images=False).to_parquet(tmp_path / "meta.parquet")
    cfg = DataConfig(source="pickapic_meta", path=str(tmp_path / "meta.parquet"), image_dir=images, resolution=16)
    out = tmp_path / "run"
    batches = list(build_dataloader(cfg, batch_size=1, seed=0, output_dir=str(out)))
    assert len(batches) == 3  # the bad pair's slot is filled by the next readable pair: batches stay full
    assert {b["pair_id"][0] for b in batches} == {"d>c", "a>c"}
    assert read_bad_pair_ids(str(out)) == {"a>b"}
    assert "b.jpg" in (out / "bad_images.txt").read_text()

    os.remove(tmp_path / "images" / "c.jpg")  # missing, and now no pair is readable
    with pytest.raises(NcpError, match="every image of all 3 pairs"):
        list(build_dataloader(cfg, batch_size=1, seed=0, output_dir=str(out)))
    cfg.on_bad_image = "error"
    with pytest.raises(NcpError, match=r"pair (a>b|d>c|a>c) .*uid.*(b|c)\.jpg"):
        list(build_dataloader(cfg, batch_size=1, seed=0))


# ---------------------------------------------------------------- the paper's filter
# Synthetic rankings with hand-known answers. ranking_id swaps rows 0 and 1, so A's latest loser is B.
#   P: A>B, A>C, B>D, C~D (tie), B>E, C>D  -> A is absolute (2 wins, no loss/draw); B lost once; C drew.
#   Q: F>H, G>H, F>G                        -> F is absolute; latest loser of F is G, of G is H.
#   R: I>J, J>K                             -> I has only 1 win: not absolute.
#   S: L>M, L~N (tie), L>N                  -> L drew: not absolute.
RANKINGS = [("P", "A", "B", 1), ("P", "C", "A", 0), ("P", "B", "D", 1), ("P", "C", "D", 0.5), ("P", "B", "E", 1),
            ("Q", "F", "H", 1), ("Q", "G", "H", 1), ("Q", "F", "G", 1), ("R", "I", "J", 1), ("R", "J", "K", 1),
            ("S", "L", "M", 1), ("S", "L", "N", 0.5), ("S", "N", "L", 0), ("P", "C", "D", 1)]


def rankings_frame() -> pd.DataFrame:
    df = pd.DataFrame(RANKINGS, columns=["caption", "image_0_uid", "image_1_uid", "label_0"])
    df["label_1"] = 1 - df["label_0"]
    df["ranking_id"] = [1, 0] + list(range(2, len(df)))
    df["jpg_0"] = [f"img-{u}".encode() for u in df["image_0_uid"]]
    df["jpg_1"] = [f"img-{u}".encode() for u in df["image_1_uid"]]
    return df


@pytest.mark.parametrize("mini_set, expected", [
    (None, [("P", "A", "B"), ("P", "A", "C"), ("Q", "F", "H"), ("Q", "F", "G")]),
    ("x>y", [("P", "A", "B"), ("Q", "F", "G")]),
    ("x>y,y>z", [("P", "A", "B"), ("P", "B", "E"), ("Q", "F", "G"), ("Q", "G", "H")]),
    ("x>y,x>z", [("P", "A", "B"), ("P", "A", "E"), ("Q", "F", "G"), ("Q", "F", "H")]),
])
def test_filter_known_answers(tmp_path, capsys, mini_set, expected):
    from ncp.data.filter import main

    rankings_frame().to_parquet(tmp_path / "rank.parquet")
    argv = ["--input", str(tmp_path / "rank.parquet"), "--output", str(tmp_path / "out.parquet")]
    main(argv + (["--mini-set", mini_set] if mini_set else []))
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out[["caption", "image_0_uid", "image_1_uid"]].itertuples(index=False, name=None)) == expected
    assert (out["label_0"] == 1).all()
    assert list(out["jpg_0"]) == [f"img-{u}".encode() for u in out["image_0_uid"]]  # images follow their uid
    assert list(out["jpg_1"]) == [f"img-{u}".encode() for u in out["image_1_uid"]]
    printed = capsys.readouterr().out
    assert "before: 12 pairs, 4 prompts (2 ties dropped)" in printed
    assert f"{len(expected)} pairs, 2 prompts" in printed


def test_filter_output_loads_as_source_and_empty_result_errors(tmp_path):
    from ncp.data.filter import main

    images = image_dir(tmp_path)
    df = pickapic_frame(with_images=False)
    df.loc[3] = ["p0", "a", "c", 1.0, 0.0]  # a now beats b and c for prompt p0: absolute winner
    df.to_csv(tmp_path / "authors.csv", index=False)
    main(["--input", str(tmp_path / "authors.csv"), "--output", str(tmp_path / "f.parquet")])
    pairs = load_pairs(DataConfig(source="pickapic_meta", path=str(tmp_path / "f.parquet"), image_dir=images))
    assert list(zip(pairs.win_uids, pairs.lose_uids)) == [("a", "b"), ("a", "c")]
    pickapic_frame(with_images=False).to_parquet(tmp_path / "none.parquet")  # nobody wins twice
    with pytest.raises(SystemExit, match="filter removed all 3 pairs"):
        main(["--input", str(tmp_path / "none.parquet"), "--output", str(tmp_path / "g.parquet")])


# ---------------------------------------------------------------- latent cache
@pytest.fixture
def tiny_models(tiny_paths):
    """Tiny SD1.5 / SDXL pipeline folders (built once per session in conftest.py), as strings."""
    return {arch: str(path) for arch, path in tiny_paths.items()}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_cache_round_trip_equals_fresh_encoding(tmp_path, tiny_models, arch):
    from dataclasses import replace

    from ncp.conditioning import encode_prompts
    from ncp.data.cache import build_cache
    from ncp.models import load_models

    model = tiny_models[arch]
    cfg = DataConfig(toy_num_pairs=6, resolution=16, proportion_empty_prompts=0.5)
    build_cache(cfg, model, str(tmp_path / "cache"), shard_size=4)
    cached = build_dataloader(replace(cfg, cache_dir=str(tmp_path / "cache")), batch_size=3, seed=2, model=model)
    fresh = build_dataloader(cfg, batch_size=3, seed=2)
    models = load_models(model)
    n = 0
    for c, f in zip(cached, fresh):
        assert c["pair_id"] == f["pair_id"] and c["prompts"] == f["prompts"] and "pixel_values" not in c
        want = models.vae.encode(f["pixel_values"]).latent_dist.mean * models.vae.config.scaling_factor
        assert c["latents"].shape == (6, 4, 8, 8)
        torch.testing.assert_close(c["latents"], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(c["original_size"], f["original_size"]) and torch.equal(c["crop_top_left"], f["crop_top_left"])
        cond = encode_prompts(models, c["prompts"])
        torch.testing.assert_close(c["prompt_embeds"], cond.encoder_hidden_states, atol=1e-5, rtol=1e-5)
        if arch == "sdxl":
            torch.testing.assert_close(c["pooled_prompt_embeds"], cond.text_embeds, atol=1e-5, rtol=1e-5)
        else:
            assert "pooled_prompt_embeds" not in c
        n += 1
    assert n == 2 and "" in {p for b in cached for p in b["prompts"]}  # some dropped prompts were read back


def test_cache_dedup_resume_bad_images_and_stale(tmp_path, tiny_models):
    from dataclasses import replace

    from ncp.data.cache import build_cache

    model = tiny_models["sd15"]
    images = image_dir(tmp_path)
    (tmp_path / "images" / "b.jpg").write_bytes(b"not an image")
    pickapic_frame(with_images=False).to_parquet(tmp_path / "meta.parquet")
    cfg = DataConfig(source="pickapic_meta", path=str(tmp_path / "meta.parquet"), image_dir=images, resolution=16)
    out = tmp_path / "cache"
    build_cache(cfg, model, str(out), shard_size=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 4 and manifest["latent_shards"] == 2  # a, b, d, c: 6 slots, 4 distinct images
    assert list(manifest["bad_uids"]) == ["b"]

    # resume: a finished shard is kept as is, a missing one is rebuilt identically
    from safetensors.torch import load_file

    first, second = out / "latents-00000.safetensors", out / "latents-00001.safetensors"
    before, mtime = load_file(str(second)), first.stat().st_mtime_ns
    second.unlink()
    build_cache(cfg, model, str(out), shard_size=2)
    assert first.stat().st_mtime_ns == mtime
    assert torch.equal(load_file(str(second))["latents"], before["latents"])

    # the pair with the corrupt image is skipped and reported from the cache too
    with pytest.warns(UserWarning, match="random crop / flip are off"):
        loader = build_dataloader(replace(cfg, cache_dir=str(out), random_flip=True), batch_size=1, seed=0,
                                  output_dir=str(tmp_path / "run"), model=model)
    assert {b["pair_id"][0] for b in loader} == {"d>c", "a>c"}
    assert read_bad_pair_ids(str(tmp_path / "run")) == {"a>b"}

    # stale caches are refused with the rebuild command
    with pytest.raises(NcpError, match=r"stale cache.*resolution.*rebuild it with: python -m ncp.data.cache"):
        build_dataloader(replace(cfg, cache_dir=str(out), resolution=32), batch_size=1, seed=0, model=model)
    with pytest.raises(NcpError, match=r"stale cache.*model"):
        build_dataloader(replace(cfg, cache_dir=str(out)), batch_size=1, seed=0, model=tiny_models["sdxl"])
    with pytest.raises(NcpError, match=r"stale cache, it lacks image uid 'toy0-0w'"):
        build_dataloader(DataConfig(resolution=16, cache_dir=str(out)), batch_size=1, seed=0, model=model)
    with pytest.raises(NcpError, match=r"no manifest.json"):
        build_dataloader(replace(cfg, cache_dir=str(tmp_path / "nothing")), batch_size=1, seed=0, model=model)


def test_cache_command_line_parses_data_options(tmp_path, tiny_models):
    from ncp.data.cache import main

    out = main(["--model", tiny_models["sd15"], "--out", str(tmp_path / "c"), "--toy-num-pairs", "3",
                "--resolution", "16", "--random-flip", "false", "--max-pairs", "2", "--device", "cpu"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 4 and manifest["key"]["resolution"] == 16 and manifest["complete"]
    with pytest.raises(SystemExit, match="data.crop must be one of"):
        main(["--model", tiny_models["sd15"], "--out", str(tmp_path / "d"), "--crop", "middle"])


def test_cache_command_line_refuses_a_word_that_is_not_a_boolean(tmp_path, capsys):
    from ncp.data.cache import main

    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--out", str(tmp_path / "c"), "--random-flip", "yes"])
    assert "argument --random-flip: 'yes' is not a boolean: true or false" in capsys.readouterr().err


def test_labels_schemas_home_paths_and_split_folders_are_checked(tmp_path, monkeypatch):
    """A label that is not a number names its file and row; shards whose columns differ name the shard; `~` in
    data paths is the home folder for every reader (a pairs file's relative images included); split names are
    looked for below data.path only."""
    df = pickapic_frame()
    df["label_0"] = df["label_0"].astype(str)  # labels written as text: numbers but one
    df.loc[2, "label_0"] = "abc"
    df.to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(NcpError, match=r"labels.parquet row 2: label_0 'abc' is not a number \(1 such rows\)"):
        load_pairs(DataConfig(source="parquet", path=str(tmp_path / "labels.parquet")))
    csv = tmp_path / "authors.csv"
    df[["image_0_uid", "image_1_uid", "label_0", "caption"]].to_csv(csv, index=False)
    with pytest.raises(NcpError, match=r"authors.csv row 2: label_0 'abc' is not a number"):
        load_pairs(DataConfig(source="authors_csv", path=str(csv), image_dir=image_dir(tmp_path)))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pickapic_frame().to_parquet(mixed / "a.parquet")
    pickapic_frame().drop(columns=["image_0_uid", "image_1_uid"]).to_parquet(mixed / "b.parquet")
    with pytest.raises(NcpError, match=r"b.parquet: its columns differ from .*a.parquet.s \(only there: \[.image_0_uid."):
        load_pairs(DataConfig(source="parquet", path=str(mixed)))

    home = tmp_path / "home"
    (home / "pp" / "img").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for uid in "ab":
        solid(COLOURS[uid]).save(home / "pp" / "img" / f"{uid}.png")
    (home / "pp" / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png"}))
    pairs = load_pairs(DataConfig(source="pairs", path="~/pp/pairs.jsonl"))
    assert pairs.stats["missing_files"] == 0 and pairs.images.win == [str(home / "pp" / "img" / "a.png")]
    from ncp.config import load_config

    assert load_config(None, ["data.source=pairs", "data.path=~/pp/pairs.jsonl"]).data.path == \
        str(home / "pp" / "pairs.jsonl")  # the training config's path too

    nested = tmp_path / "test-runs" / "pick"  # a folder above data.path named like a split
    nested.mkdir(parents=True)
    pickapic_frame().to_parquet(nested / "shard0.parquet")
    assert len(load_pairs(DataConfig(source="parquet", path=str(nested)))) == 3


def test_user_pairs_are_named_by_their_real_line(tmp_path):
    """Blank lines and a prompt quoted over two lines do not shift the `<file>:<line>` names that reports and
    bad_images.txt use; a line that is not JSON is named by its number."""
    image_dir(tmp_path)
    (tmp_path / "pairs.csv").write_text('prompt,chosen,rejected\n\n"two\nlines",images/a.jpg,images/b.jpg\n'
                                        "p,images/c.jpg,images/d.jpg\n\n,,\np2,images/e.jpg,images/f.jpg\n")
    pairs = load_pairs(DataConfig(source="pairs", path=str(tmp_path / "pairs.csv")))
    assert pairs.pair_ids == ["pairs.csv:3", "pairs.csv:5", "pairs.csv:8"]  # line 7's empty cells: a record, dropped
    assert pairs.stats["empty_paths"] == 1
    row = lambda w, l: json.dumps({"prompt": "p", "chosen": f"images/{w}.jpg", "rejected": f"images/{l}.jpg"})  # noqa: E731
    (tmp_path / "pairs.jsonl").write_text(f"{row('a', 'b')}\n\n{row('c', 'd')}\n")
    assert load_pairs(DataConfig(source="pairs", path=str(tmp_path / "pairs.jsonl"))).pair_ids == \
        ["pairs.jsonl:1", "pairs.jsonl:3"]
    (tmp_path / "bad.jsonl").write_text(f"{row('a', 'b')}\n{{\"prompt\": \"p\", \n")
    with pytest.raises(NcpError, match=r"bad.jsonl: cannot read .*; line 2 is not JSON"):
        load_pairs(DataConfig(source="pairs", path=str(tmp_path / "bad.jsonl")))


def test_parquet_without_uids_names_images_by_file_content_and_row(tmp_path):
    """Images of uid-less parquet are the latent cache's keys: a file's rows keep their names whether it is read
    alone or with others, and a file with other content (same row count) gets other names, so a cache built on
    other data is refused for the images it lacks instead of serving another file's latents by row number."""
    d = tmp_path / "shards"
    d.mkdir()
    flat = pickapic_frame().drop(columns=["image_0_uid", "image_1_uid"])
    flat.to_parquet(d / "part-0.parquet")
    flat.assign(caption=["s0", "s1", "s2", "s3"]).to_parquet(d / "part-1.parquet")
    both = load_pairs(DataConfig(source="parquet", path=str(d)))
    alone = load_pairs(DataConfig(source="parquet", path=str(d / "part-1.parquet")))
    assert len(set(both.win_uids + both.lose_uids)) == 12  # 3 decided pairs per file, 2 images each
    assert both.win_uids[3:] == alone.win_uids and both.lose_uids[3:] == alone.lose_uids
    assert not set(both.win_uids[:3]) & set(alone.win_uids)
    swapped = flat.copy()
    swapped["jpg_0"], swapped["jpg_1"] = flat["jpg_1"], flat["jpg_0"]
    swapped.to_parquet(d / "part-1.parquet")
    assert not set(load_pairs(DataConfig(source="parquet", path=str(d / "part-1.parquet"))).win_uids) & set(alone.win_uids)
