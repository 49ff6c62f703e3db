"""The one typed configuration: dataclass defaults, YAML files that hold only what differs, and
`key.sub=value` overrides. Unknown keys, wrong types and impossible combinations fail before any
model loads, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.config import DataConfig
from .encoder import ERRORS, FEATURES
from . import families
from .errors import NcpError
from .fast import ATTENTION, COMPILE_MODES
from .models import LORA_TARGETS
from .objective import ObjectiveConfig
from .quantize import QUANTIZE


# encoder.error=auto: per train.mixed_precision, the cheapest way to compute the perceptual error whose
# per-sample errors stay within 5% of float64 (median, every t bucket) with a LoRA-gradient cosine >= 0.99,
# on the toy base and the SD1.5 architecture (benchmarks/precision.py, benchmarks/RESULTS.md section 3).
FP32_QUANTIZED = ("encoder.error=fp32 keeps an fp32 copy of f, which model.quantize would have to dequantize (4 bytes "
                  "a weight); use encoder.error=linearized (exact through the quantized layers) or difference")
AUTO_ERROR = {"no": "difference", "fp16": "linearized", "bf16": "linearized"}


@dataclass
class ModelConfig:
    pretrained: str = "outputs/tiny-sd15"  # hub id or local diffusers folder; default: python -m ncp.tiny --out outputs/tiny-sd15
    arch: str | None = None  # sd15 | sdxl | sd3; None = detect from the pipeline folder (set it to guard against mix-ups)
    vae: str | None = None  # VAE override, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16
    revision: str | None = None  # hub revision, for reproducible downloads
    variant: str | None = None  # e.g. fp16 weight files on the hub
    text_encoder_3: bool = True  # sd3: false drops T5 (4.7B parameters) as the pipeline allows: zeros in its place
    guidance: float | None = None  # flux dev: the embedded guidance scale it trains at (None = 3.5, diffusers' FLUX LoRA default); schnell has none
    max_sequence_length: int | None = None  # flux: T5 tokens per prompt (None = the pipeline's: dev 512, schnell 256)
    quantize: str = "none"  # none | int8 | nf4: sd3/flux transformer + T5 in 8 / 4 bits under the LoRA (QLoRA), CUDA only


@dataclass
class EncoderConfig:
    features: str = "last"  # last down block (authors' SDXL); "multiscale" = authors' SD1.5 (down + mid + all states)
    pool: bool = False  # spatial mean-pool the features before the distance (sd3: mean over image tokens)
    blocks: int | None = None  # sd3: joint transformer blocks in f; None = a quarter of them (measured, docs/sd3.md)
    error: str = "auto"  # difference | linearized | fp32 | auto (chosen by train.mixed_precision): docs/precision.md
    batch_calls: bool = False  # difference / fp32: f on true, policy and reference x_{t'} in one call of 3x the batch


@dataclass
class LoraConfig:
    rank: int = 64  # the paper: rank-64 LoRA on the U-Net
    alpha: float | None = None  # None = rank (scale 1), as the authors
    init: str = "gaussian"  # peft init of A (B starts at zero, so policy = reference at step 0)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # attention projections


@dataclass
class OptimConfig:
    optimizer: str = "adamw8bit"  # the paper's 8-bit AdamW (bitsandbytes); "adamw" = torch AdamW
    lr: float = 1e-8  # per-sample lr: the paper's "1e-8 x effective batch" with scale_lr
    scale_lr: bool = True  # multiply lr by batch_size x grad_accum x processes
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW defaults (authors)
    weight_decay: float = 1e-2  # authors' launch scripts
    eps: float = 1e-8  # AdamW default
    max_grad_norm: float = 1.0  # authors' clip
    lr_scheduler: str = "constant_with_warmup"  # official Diffusion-DPO; any diffusers get_scheduler name
    warmup_steps: int = 250  # SD1.5 NCP-DPO launch script


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"  # LoRA, config.yaml, metrics.jsonl, checkpoints/, validation/, logs/
    seed: int = 0  # model init of LoRA, data order and all training randomness
    batch_size: int = 1  # pairs per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1500  # optimizer steps (SD1.5 NCP-DPO launch script)
    max_epochs: float | None = None  # if set, the run length in passes over the data (overrides max_steps)
    mixed_precision: str = "no"  # no | fp16 | bf16: frozen weights in this precision, LoRA stays fp32
    gradient_checkpointing: bool = False  # trade compute for memory on the policy U-Net
    compile: bool = False  # torch.compile the U-Net and f (docs/training.md "Fast path": minutes of compiling first)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune(-no-cudagraphs)
    channels_last: bool = False  # channels-last weights for the U-Net, VAE and f (docs/training.md "Fast path")
    attention: str = "auto"  # SDPA backend: auto (PyTorch picks) | flash | efficient | cudnn | math
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    keep_checkpoints: int = 3  # oldest are deleted beyond this many
    resume_from: str | None = None  # "latest" (the newest checkpoint; fresh start if none) or a checkpoint folder
    overwrite: bool = False  # a new run into a folder holding a run is refused unless this clears the folder first
    log_every: int = 1  # optimizer steps between metrics.jsonl / tensorboard lines
    validate_every: int = 0  # optimizer steps between validation grids; 0 = only at the end
    validation_prompts: list[str] = field(default_factory=lambda: [  # rendered at fixed seeds into validation/step-*.png
        "a red circle on a white background", "a blue square on a black background"])
    validation_steps: int = 25  # sampler steps for validation images
    validation_guidance: float = 7.5  # classifier-free guidance scale for validation images
    validation_reward: str | None = None  # score validation images each time: toy | pickscore (ncp.evaluate)
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops (after a checkpoint)
    report_to: str = "tensorboard"  # tensorboard | wandb | all | none: accelerate trackers (logs/ for tensorboard)
    process_timeout_s: int = 1800  # how long processes wait for each other (validation runs on the first one alone)


REPORT_TO = ("tensorboard", "wandb", "all", "none")

# Keys a resumed run may change: its length, logging, checkpoints, validation, output and upload. Every other
# key (model, objective, encoder, LoRA, optimizer, batch, accumulation, precision, seed, data) defines the run
# and goes into the fingerprint that a resume must match. model.arch is derived from the model, so it is left out.
RESUMABLE_CHANGES = ("model.arch", "train.output_dir", "train.max_steps", "train.max_epochs", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.resume_from", "train.overwrite", "train.log_every",
                     "train.validate_every", "train.validation_prompts", "train.validation_steps",
                     "train.validation_guidance", "train.validation_reward", "train.max_bad_steps", "train.report_to",
                     "train.gradient_checkpointing", "train.compile", "train.compile_mode", "train.channels_last",
                     "train.attention", "train.process_timeout_s", "encoder.batch_calls", "data.num_workers", "data.prepared_dir",
                     "data.on_bad_image", "hub.")  # a skipped pair's stand-in is a pure function of its index


@dataclass
class HubConfig:
    repo_id: str | None = None  # upload the final LoRA, a model card and a sample grid here at the end
    private: bool = False  # create the repo private
    license: str | None = None  # license id for the model card (e.g. creativeml-openrail-m); none by default


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def validate(self) -> None:
        for key, value in self.flat().items():  # before the range checks: NaN passes `beta <= 0`
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                raise NcpError(f"{key} must be finite (no NaN or inf), got {value}")
        self.objective.validate()
        self.data.validate()
        if self.model.arch not in (None, *families.names()):
            raise NcpError(f"model.arch must be {', '.join(families.names())} or null, got {self.model.arch!r}")
        if self.model.quantize not in QUANTIZE:
            raise NcpError(f"model.quantize must be one of {', '.join(QUANTIZE)}, got {self.model.quantize!r}")
        if self.model.quantize != "none" and self.model.arch is not None:
            families.get(self.model.arch).check_quantize(self.model.quantize)
        if self.model.quantize != "none" and self.encoder.error == "fp32":
            raise NcpError(FP32_QUANTIZED)
        if self.encoder.blocks is not None and self.encoder.blocks < 1:
            raise NcpError(f"encoder.blocks must be >= 1 or null, got {self.encoder.blocks}")
        if self.encoder.features not in FEATURES:
            raise NcpError(f"encoder.features must be one of {FEATURES}, got {self.encoder.features!r}")
        if self.encoder.error not in ERRORS + ("auto",):
            raise NcpError(f"encoder.error must be one of {ERRORS + ('auto',)}, got {self.encoder.error!r}")
        if self.encoder.error == "linearized" and self.objective.target != "prev":
            # re-noising at a fresh t' moves f's input by the whole prediction error: no small step to linearize
            raise NcpError("encoder.error=linearized needs objective.target=prev (the one-step DDPM target)")
        if self.optim.optimizer not in ("adamw8bit", "adamw"):
            raise NcpError(f"optim.optimizer must be adamw8bit or adamw, got {self.optim.optimizer!r}")
        if self.train.mixed_precision not in ("no", "fp16", "bf16"):
            raise NcpError(f"train.mixed_precision must be no, fp16 or bf16, got {self.train.mixed_precision!r}")
        if len(self.optim.betas) != 2:
            raise NcpError(f"optim.betas must hold two numbers, got {self.optim.betas}")
        positive = {"lora.rank": self.lora.rank, "train.batch_size": self.train.batch_size,
                    "train.grad_accum": self.train.grad_accum, "train.max_steps": self.train.max_steps,
                    "train.checkpoint_every": self.train.checkpoint_every, "train.keep_checkpoints": self.train.keep_checkpoints,
                    "train.log_every": self.train.log_every, "train.max_bad_steps": self.train.max_bad_steps,
                    "train.process_timeout_s": self.train.process_timeout_s,
                    "optim.lr": self.optim.lr}
        for key, value in positive.items():
            if value <= 0:
                raise NcpError(f"{key} must be > 0, got {value}")
        if self.train.max_epochs is not None and self.train.max_epochs <= 0:
            raise NcpError(f"train.max_epochs must be > 0 or null, got {self.train.max_epochs}")
        if self.train.validation_reward not in (None, "toy", "pickscore", "hpsv2", "imagereward"):
            raise NcpError(f"train.validation_reward must be toy, pickscore, hpsv2, imagereward or null, "
                           f"got {self.train.validation_reward!r}")
        if self.train.compile_mode not in COMPILE_MODES:
            raise NcpError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.train.compile_mode!r}")
        if self.train.attention not in ATTENTION:
            raise NcpError(f"train.attention must be one of {ATTENTION}, got {self.train.attention!r}")
        if self.train.report_to not in REPORT_TO:
            raise NcpError(f"train.report_to must be one of {', '.join(REPORT_TO)}, got {self.train.report_to!r}")
        if self.train.overwrite and self.train.resume_from is not None:
            raise NcpError("train.overwrite=true clears the run folder, train.resume_from continues it: set one of them")
        if self.optim.warmup_steps < 0 or self.train.validate_every < 0:
            raise NcpError("optim.warmup_steps and train.validate_every must be >= 0")

    def resolve(self) -> None:
        """Settings that follow from others: encoder.error=auto becomes the measured choice for the run's precision;
        ~ in data paths becomes the home folder."""
        self.data.expand_home()
        mp = self.train.mixed_precision
        if self.encoder.error == "auto" and mp in AUTO_ERROR:
            mode = AUTO_ERROR[mp]
            self.encoder.error = "fp32" if mode == "linearized" and self.objective.target != "prev" else mode
            if self.encoder.error == "fp32" and self.model.quantize in QUANTIZE[1:]:  # a bad value: validate says
                raise NcpError(f"encoder.error=auto chose fp32 (objective.target={self.objective.target}): "
                               + FP32_QUANTIZED)
        elif self.encoder.error == "difference" and mp in ("fp16", "bf16") and self.objective.space == "perceptual":
            warnings.warn(f"encoder.error=difference with train.mixed_precision={mp}: rounding of f's two evaluations "
                          f"exceeds the error they measure (benchmarks/RESULTS.md, precision); encoder.error=auto "
                          f"uses {AUTO_ERROR[mp]}")
        if self.data.cache_dir and not self.model.text_encoder_3 and self.train.validation_prompts:
            warnings.warn("model.text_encoder_3=false with data.cache_dir: training reads the cache's prompt embeddings "
                          "(T5's included: python -m ncp.data.cache loads T5) while validation renders without T5, "
                          "zeros in its place; validation images then show another conditioning than training's")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """{"train.max_steps": 1500, ...}: every key with its value."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

    def fingerprint(self, num_processes: int) -> dict:
        """The settings that define the run (see RESUMABLE_CHANGES), and the number of processes."""
        keep = {k: v for k, v in self.flat().items() if not k.startswith(RESUMABLE_CHANGES)}
        return {**keep, "processes": num_processes}


def changed_keys(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every fingerprint entry that differs. A key the saved run predates (added to the
    config since, e.g. data.filter) counts as unchanged while it is at its default; one that a resume may change
    now (it joined RESUMABLE_CHANGES since the run was saved, e.g. data.on_bad_image) is not compared."""
    default = Config().flat()
    saved = {k: v for k, v in saved.items() if not k.startswith(RESUMABLE_CHANGES)}
    saved = {**{k: default[k] for k in now if k not in saved and k in default}, **saved}
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def describe_keys() -> str:
    """Every key with its default and the reason from the trailing `# comment` of its field (for --help)."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        reasons = _field_comments(cls)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            shown = default if isinstance(default, str) else yaml.safe_dump(default, default_flow_style=True).split("\n")[0]
            lines.append(f"  {section.name}.{f.name}={shown}" + (f"  # {reasons[f.name]}" if f.name in reasons else ""))
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """{field: its trailing comment} read from the dataclass's source (the comments are the documentation)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if found:
                out[node.target.id] = found[0]
    return out


def _check_type(value, tp, key: str):
    """Return value converted to the annotated type, or raise NcpError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except NcpError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise NcpError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-8" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise NcpError(f"{key} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _merge(obj, values: dict, prefix: str, source: str, explicit: set) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise NcpError(f"{source}: unknown key {name!r}{_suggest(name, prefix, hints)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise NcpError(f"{source}: {name} must be a section (mapping), got {value!r}")
            _merge(getattr(obj, key), value, f"{name}.", source, explicit)
        else:
            setattr(obj, key, _check_type(value, hints[key], name))
            explicit.add(name)


def _suggest(name: str, prefix: str, hints: dict) -> str:
    """'; did you mean train.max_steps?' for the closest key of the whole config (a misspelling, or a key in the
    wrong section), else the keys known where `name` was given."""
    keys = [*Config().flat(), *([] if "." in name else [f.name for f in dataclasses.fields(Config)])]
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
    if not close:  # the right name in the wrong section, e.g. optim.max_steps
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys if "." in k}
        close = [leaves[m] for m in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.8)]
    if close:
        return f"; did you mean {close[0]}?"
    return f" (known: {', '.join(f'{prefix}{k}' for k in hints)})"


class YamlLoader(yaml.SafeLoader):
    """YAML with the 1.2 booleans: only true / false. YAML 1.1 (PyYAML's default) also reads no / off /
    yes / on as booleans, which turned the documented `train.mixed_precision: no` into False."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def read_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


def parse_override(item: str) -> dict:
    """`train.max_steps=5` -> {"train": {"max_steps": 5}}; values are parsed as YAML scalars / lists."""
    if "=" not in item:
        raise NcpError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = read_yaml(raw) if raw != "" else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | None = None, overrides: list[str] = (), **forced) -> Config:
    """Defaults <- YAML file <- overrides, then validate. `forced` = {"objective.loss": "dpo"} set by a script."""
    cfg, explicit = Config(), set()
    if path is not None:
        try:
            values = read_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise NcpError(f"{path}: cannot read the config ({e})") from e
        if not isinstance(values, dict):
            raise NcpError(f"{path}: a config must be a mapping of sections")
        _merge(cfg, values, "", str(path), explicit)
    for item in overrides:
        _merge(cfg, parse_override(item), "", "command line", explicit)
    for key, value in forced.items():
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        if key in explicit and current != value:
            raise NcpError(f"{key}={current!r} in the config, but this script trains {key}={value!r}")
        setattr(getattr(cfg, section), name, value)
    cfg.resolve()
    cfg.validate()
    return cfg


# -- files named by the config: checked before the run folder guard and before any model or hub lookup -----------
def looks_local(value: str) -> bool:
    """A local path rather than a hub id (`org/name`): it starts with `.`, `/` or `~`, has more than one
    separator, or its first part is outputs/ or a folder that exists here."""
    if value.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in value):
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and (parts[0] == "outputs" or Path(parts[0]).is_dir()))


def check_model_path(value: str | None, key: str, arch: str | None = None) -> None:
    """One NcpError line, at once, for a model that cannot load: a local folder that does not exist (instead of
    hub retries and "does not appear to have a file named config.json"), or a hub id outside the cache offline."""
    if value is None or Path(value).expanduser().exists():
        return
    if looks_local(value):
        if key == "model.vae":
            raise NcpError(f"{key}={value}: no such folder; give a hub id (org/name) or an existing VAE folder")
        make = (f"python -m ncp.toy_base --out {value}" if "toy" in Path(value).name
                else f"python -m ncp.tiny --arch {arch or families.DEFAULT} --out {value}")
        raise NcpError(f"{key}={value}: no such folder. Write a tiny offline pipeline there with `{make}`, or give "
                       f"a hub id (org/name) or an existing diffusers folder")
    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"models--{value.replace('/', '--')}"
    if constants.HF_HUB_OFFLINE and not cached.is_dir():
        raise NcpError(f"{key}={value}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                       f"forbids downloading it: download it once online (hf download {value}) or give a local folder")


def check_paths(cfg: Config) -> None:
    """Missing models and data files, as one NcpError line naming the key: cheap, so it runs before the run folder
    guard (a typo must not cost a cleared folder) and before minutes of loading."""
    check_model_path(cfg.model.pretrained, "model.pretrained", cfg.model.arch)
    check_model_path(cfg.model.vae, "model.vae")
    d = cfg.data
    if d.path and (d.source in ("pairs", "parquet", "pickapic_meta", "authors_csv") or looks_local(d.path)):
        import glob

        found = glob.glob(os.path.expanduser(d.path)) if any(ch in d.path for ch in "*?[") else \
            Path(d.path).expanduser().exists()
        if not found:
            raise NcpError(f"data.path={d.path}: no such file or folder (data.source={d.source})")
    if d.image_dir and not Path(d.image_dir).expanduser().is_dir():
        raise NcpError(f"data.image_dir={d.image_dir}: no such folder")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
