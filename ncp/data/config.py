"""Settings of the preference-data layer (`data.*` keys of the training config)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ncp.errors import NcpError

SOURCES = ("toy", "hub", "parquet", "pickapic_meta", "authors_csv", "pairs")
CROPS = ("center", "random")
ON_BAD_IMAGE = ("skip", "error")
MINI_SETS = ("x>y", "x>y,x>z", "x>y,y>z")  # Table 2 of the paper (ncp/data/filter.py)
FILTERS = ("none", "absolute_winners", *MINI_SETS)
FILTERABLE = ("hub", "parquet", "pickapic_meta", "authors_csv")  # sources with rankings (caption, uids, labels)


@dataclass
class DataConfig:
    """Where the pairs come from and how images become tensors; `validate()` checks it before any load."""

    source: str = "toy"  # built-in toy pairs need no files, so the quickstart and tests run offline
    path: str | None = None  # hub id / save_to_disk dir / parquet file,dir,glob / metadata parquet / CSV / pairs file
    image_dir: str | None = None  # folder of <uid>.jpg for pickapic_meta and authors_csv
    filter: str = "none"  # absolute_winners = the paper's 87,687 pairs; none = every decided pair; or a Table 2 mini-set
    prepared_dir: str | None = None  # data.source=hub streams into this local parquet once (None: ~/.cache/ncp/prepared/<id>)
    split: str = "train"  # Pick-a-Pic splits: train, validation, test, validation_unique, test_unique
    max_pairs: int | None = None  # cap after tie dropping, for quick runs on a slice of a big set
    resolution: int = 32  # tiny default for the toy data; the paper uses 512 (SD1.5) and 1024 (SDXL)
    crop: str = "center"  # center keeps the subject; random matches the official Diffusion-DPO option
    random_flip: bool = False  # off by default: a flip can break captions that say "left"/"right"
    proportion_empty_prompts: float = 0.0  # official Diffusion-DPO trains with 0.2 for classifier-free guidance
    on_bad_image: str = "skip"  # one corrupt jpg in 1M should not kill a run hours in; "error" for strict runs
    cache_dir: str | None = None  # precomputed latents + text embeddings (python -m ncp.data.cache)
    num_workers: int = 0  # decode in worker processes so loading never stalls a GPU step
    toy_num_pairs: int = 512  # enough pairs for the toy benchmark to show a preference shift
    toy_seed: int = 0  # the toy set is a pure function of this seed

    def __post_init__(self) -> None:
        self.expand_home()

    def expand_home(self) -> None:
        """~ in a local path becomes the home folder, once: every reader, and a pairs file's relative image paths,
        see the real folder (load_config calls it after its overrides, a DataConfig built in code at creation)."""
        for key in ("path", "image_dir", "cache_dir", "prepared_dir"):
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, key, os.path.expanduser(value))

    def validate(self) -> None:
        """Raise NcpError naming the first bad `data.*` key."""
        choices = {"source": SOURCES, "crop": CROPS, "on_bad_image": ON_BAD_IMAGE, "filter": FILTERS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise NcpError(f"data.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.source != "toy" and not self.path:
            raise NcpError(f"data.path is required when data.source={self.source!r}")
        if self.filter != "none" and self.source not in FILTERABLE:
            raise NcpError(f"data.filter={self.filter!r} needs Pick-a-Pic rankings ({', '.join(FILTERABLE)}); "
                           f"data.source={self.source!r} has none: use data.filter=none")
        if self.source in ("pickapic_meta", "authors_csv") and not self.image_dir:
            raise NcpError(f"data.image_dir is required when data.source={self.source!r} (folder of <uid>.jpg)")
        if self.resolution < 8 or self.resolution % 8:
            raise NcpError(f"data.resolution must be a positive multiple of 8 (VAE downsampling); got {self.resolution}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise NcpError(f"data.max_pairs must be >= 1 or null; got {self.max_pairs}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise NcpError(f"data.proportion_empty_prompts must be in [0, 1]; got {self.proportion_empty_prompts}")
        if self.num_workers < 0:
            raise NcpError(f"data.num_workers must be >= 0; got {self.num_workers}")
        if self.toy_num_pairs < 1:
            raise NcpError(f"data.toy_num_pairs must be >= 1; got {self.toy_num_pairs}")
