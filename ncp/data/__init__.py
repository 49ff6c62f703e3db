"""Preference data: sources, pair loading, the paper's filters, the latent cache and the built-in toy set."""

from ncp.data.config import DataConfig
from ncp.data.loader import PairDataset, ShardSampler, build_dataloader, collate_pairs, endless_batches, read_bad_pair_ids
from ncp.data.sources import Pairs, load_pairs
from ncp.data.toy import toy_prompts, toy_reward

__all__ = ["DataConfig", "PairDataset", "Pairs", "ShardSampler", "build_dataloader", "collate_pairs", "endless_batches", "load_pairs",
           "read_bad_pair_ids", "toy_prompts", "toy_reward"]
