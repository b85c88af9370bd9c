"""Typed config tree: dataclass defaults, TOML files, ``--set section.key=value`` overrides.

The built-in defaults are the embedded default run (digits, small CNN, sparse CGE);
``configs/default.toml`` states the same values and a test keeps the two in step.
Every user mistake raises :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | mnist | hdf5 | synthetic
    dir: str = ""  # directory (cifar10, mnist) or .h5 file / directory (hdf5)
    batch_size: int = 64
    test_batch_size: int = 1000
    augment: bool = False  # CIFAR random crop (pad 4) + horizontal flip
    limit: int = 0  # use only the first N training examples (0 = all)
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: int = 10
    synthetic_size: int = 1024


@dataclass
class TaskConfig:
    """What is trained: ``classify`` (the data set and model below, cross entropy), or a plug-in
    ``package.module:factory`` called as ``factory(cfg)``; every other key of ``[task]`` is
    the task's own option, validated by the task."""

    name: str = "classify"
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "digits_cnn"  # a zoo name, or package.module:factory called as factory(cfg)


@dataclass
class ZOConfig:
    estimator: str = "cge"  # cge | rge | lizo | spsa (optim.name = "lizo" is an alias of lizo)
    mu: float = 5e-3
    difference: str = "forward"  # forward | central
    query_batch: int = 32  # perturbed copies evaluated in one stacked forward
    rge_queries: int = 64  # directions per step for RGE
    spsa_queries: int = 2  # Gaussian directions per step for SPSA (split over the ranks)
    spsa_check_every: int = 50  # SPSA: steps between replica checksum checks (0 = never)
    features: str = "auto"  # broadcast | recompute | auto (measured at start-up)
    feature_reuse: bool = True  # false: every CGE query is a full forward (for comparisons)
    precision: str = "ieee"  # ieee | delta-tf32 | delta-bf16: CGE queries as differences (zohpc.zo.delta)
    # what the queries perturb: the model's parameters, or (gray-box mode, zohpc.steps.graybox)
    # its outputs, the objective's gradient there backpropagated through a differentiable model
    boundary: str = "parameters"  # parameters | outputs


@dataclass
class PruneConfig:
    method: str = "zo_grasp"  # none | zo_grasp | grasp | random | magnitude
    sparsity: float = 0.5
    mask_interval: int = 1  # epochs between fresh layer-wise random masks (0 = fixed mask); 1: see README "Sparse quality"
    masks_file: str = ""  # HDF5 mask file from `python -m zohpc.prune`
    queries: int = 192  # RGE directions for zo_grasp
    mu: float = 5e-3
    samples_per_class: int = 25


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | lizo
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: int = 0
    step_epochs: int = 30  # step schedule: decay every N epochs
    gamma: float = 0.1  # step schedule: decay factor
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    # LIZO
    num_sample_per_step: int = 8
    reuse_distance_bound: float = -1.0  # -1 = 2 * lr (ReLIZO's suggestion); 0 = no reuse
    max_reuse_rate: float = 0.5
    orthogonal_sample: bool = False
    line_search: bool = False


@dataclass
class LoRAConfig:
    """LoRA adapters (:mod:`zohpc.lora`); ``target = ""``: none, every parameter trains."""

    target: str = ""  # regular expression (re.search) over module names: the nn.Linear layers adapted
    rank: int = 8
    alpha: float = 16.0  # the update is (alpha / rank) B A
    trainable: str = ""  # regular expression over parameter names also trained (e.g. a new head)


@dataclass
class TrainConfig:
    epochs: int = 30
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every_seconds: float = 5.0
    max_steps: int = 0  # stop after this many steps in total (0 = no limit; for tests)


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    keep: int = 3


@dataclass
class RunConfig:
    out: str = "runs/default"


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write TensorBoard event files (needs the extra zohpc[tensorboard])


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "data.name": ("digits", "cifar10", "mnist", "hdf5", "synthetic"),
    "zo.estimator": ("cge", "rge", "lizo", "spsa"),
    "zo.difference": ("forward", "central"),
    "zo.features": ("auto", "broadcast", "recompute"),
    "zo.precision": ("ieee", "delta-tf32", "delta-bf16"),
    "zo.boundary": ("parameters", "outputs"),
    "prune.method": ("none", "zo_grasp", "grasp", "random", "magnitude"),
    "optim.name": ("sgd", "adam", "lizo"),
    "optim.schedule": ("cosine", "step", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
}

# key -> (predicate, description of the allowed range)
RANGES = {
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.test_batch_size": (lambda v: v >= 1, ">= 1"),
    "data.limit": (lambda v: v >= 0, ">= 0"),
    "data.synthetic_classes": (lambda v: v >= 2, ">= 2"),
    "data.synthetic_size": (lambda v: v >= 1, ">= 1"),
    "data.synthetic_shape": (lambda v: len(v) == 3 and all(d >= 1 for d in v), "3 positive integers [C, H, W]"),
    "zo.mu": (lambda v: v > 0, "> 0"),
    "zo.query_batch": (lambda v: v >= 1, ">= 1"),
    "zo.rge_queries": (lambda v: v >= 1, ">= 1"),
    "zo.spsa_queries": (lambda v: v >= 1, ">= 1"),
    "zo.spsa_check_every": (lambda v: v >= 0, ">= 0 (0 = never)"),
    "prune.sparsity": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "prune.mask_interval": (lambda v: v >= 0, ">= 0"),
    "prune.queries": (lambda v: v >= 1, ">= 1"),
    "prune.mu": (lambda v: v > 0, "> 0"),
    "prune.samples_per_class": (lambda v: v >= 1, ">= 1"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.momentum": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "optim.step_epochs": (lambda v: v >= 1, ">= 1"),
    "optim.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "optim.num_sample_per_step": (lambda v: v >= 1, ">= 1"),
    "optim.reuse_distance_bound": (lambda v: v == -1 or v >= 0, "-1 (= 2 * lr) or >= 0"),
    "optim.max_reuse_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lora.rank": (lambda v: v >= 1, ">= 1"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "train.epochs": (lambda v: v >= 1, ">= 1"),
    "train.seed": (lambda v: v >= 0, ">= 0"),
    "train.log_every_seconds": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v >= 0, ">= 0"),
    "checkpoint.every_epochs": (lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "checkpoint.keep": (lambda v: v >= 1, ">= 1"),
}

NEEDS_DIR = ("cifar10", "mnist", "hdf5")

PATH_KEYS = ("data.dir", "prune.masks_file", "run.out")

# Keys that may change when a run is resumed: they extend or observe the run without
# altering its trajectory. Every other key is compared with the stored config on resume.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.log_every_seconds", "train.device",
                     "data.test_batch_size", "zo.features", "checkpoint.every_epochs", "checkpoint.keep",
                     "run.out", "logging.tensorboard")


def expand_path(value: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded, as a shell would."""
    return os.path.expandvars(os.path.expanduser(value)) if value else value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp, value):
    """Check ``value`` against the field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config field type {tp} for {key}")


def _section_types(section_cls) -> dict:
    return typing.get_type_hints(section_cls)


def _sections() -> dict:
    return typing.get_type_hints(Config)


def apply_mapping(cfg: Config, mapping: dict, source: str) -> None:
    """Set values from a nested ``{section: {key: value}}`` mapping, rejecting unknown names."""
    sections = _sections()
    for section, table in mapping.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown config section '{section}' (known: {', '.join(sections)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{section}' must be a table of keys")
        obj = getattr(cfg, section)
        types = _section_types(type(obj))
        for key, value in table.items():
            if section == "task" and key != "name":
                if key == "options" and isinstance(value, dict):
                    obj.options.update(value)
                else:
                    obj.options[key] = value  # the task validates its own options
                continue
            if key not in types:
                raise ConfigError(f"{source}: unknown config key '{section}.{key}' (known in [{section}]: {', '.join(types)})")
            setattr(obj, key, _coerce(f"{section}.{key}", types[key], value))


def parse_override(text: str) -> tuple[str, str, object]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected section.key=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise ConfigError(f"--set '{text}': key must be section.key (e.g. optim.lr=0.1)")
    section, key = dotted.split(".")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | None = None, overrides: list[str] = (), out: str | None = None) -> Config:
    """Defaults, then the TOML file, then ``--set`` overrides, then validation."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            with open(path, "rb") as fh:
                mapping = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{path}' is not UTF-8 text (TOML): byte {exc.start} is "
                              f"{exc.object[exc.start:exc.start + 1]!r}") from None
        except OSError as exc:
            raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
        apply_mapping(cfg, mapping, f"config file '{path}'")
    for text in overrides:
        section, key, value = parse_override(text)
        apply_mapping(cfg, {section: {key: value}}, f"--set {text}")
    if out:
        cfg.run.out = out
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, expand_path(get(cfg, dotted)))
    validate(cfg)
    check_extras(cfg)
    return cfg


def check_extras(cfg: Config) -> None:
    """Refuse a config that asks for an optional package that is not installed (one line)."""
    if cfg.logging.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("config key 'logging.tensorboard': the tensorboard package is not installed "
                              "(pip install 'zohpc[tensorboard]')")


def get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def estimator_name(cfg: Config) -> str:
    """The estimator: ``zo.estimator``; the old ``optim.name = "lizo"`` is an alias of
    ``zo.estimator = "lizo"`` (configs written before the two keys merged keep working)."""
    return "lizo" if cfg.optim.name == "lizo" else cfg.zo.estimator


# estimators that search every trainable parameter (masks and pruning do not apply)
DENSE_ESTIMATORS = ("lizo", "spsa")


def validate(cfg: Config) -> None:
    """Range and choice checks across the whole tree, plus existence of the data directory."""
    if cfg.optim.name == "lizo" and cfg.zo.estimator not in ("cge", "lizo"):
        raise ConfigError(f"config key 'optim.name': 'lizo' is the old spelling of zo.estimator = \"lizo\" and "
                          f"conflicts with zo.estimator = {cfg.zo.estimator!r}; set only zo.estimator")
    for dotted, choices in CHOICES.items():
        value = get(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"config key '{dotted}': {value!r} is not one of {', '.join(choices)}")
    for dotted, (ok, desc) in RANGES.items():
        value = get(cfg, dotted)
        if not ok(value):
            raise ConfigError(f"config key '{dotted}': {value!r} is out of range (must be {desc})")
    if cfg.zo.boundary == "outputs":
        check_graybox(cfg)
    if cfg.data.name in NEEDS_DIR:
        if not cfg.data.dir:
            raise ConfigError(f"config key 'data.dir': required for data.name = '{cfg.data.name}'")
        if not os.path.exists(cfg.data.dir):
            raise ConfigError(f"config key 'data.dir': '{cfg.data.dir}' does not exist")
    if cfg.prune.masks_file and not os.path.isfile(cfg.prune.masks_file):
        raise ConfigError(f"config key 'prune.masks_file': '{cfg.prune.masks_file}' does not exist")
    for dotted in ("lora.target", "lora.trainable"):
        try:
            re.compile(get(cfg, dotted))
        except re.error as exc:
            raise ConfigError(f"config key '{dotted}': {get(cfg, dotted)!r} is not a regular expression ({exc})") from None
    if cfg.lora.trainable and not cfg.lora.target:
        raise ConfigError("config key 'lora.trainable': needs lora.target (the adapters it trains beside)")
    if not cfg.run.out:
        raise ConfigError("config key 'run.out': must name an output directory")
    from .models import MODEL_NAMES  # late import: models import torch

    if ":" not in cfg.model.name and cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"config key 'model.name': {cfg.model.name!r} is not one of {', '.join(MODEL_NAMES)}")


def check_graybox(cfg: Config) -> None:
    """Gray-box mode estimates the objective's gradient at the outputs by CGE and steps
    ``optim.name`` (sgd | adam) on the backpropagated gradient: no other estimator, no masks."""
    if estimator_name(cfg) != "cge":
        raise ConfigError(f"config key 'zo.boundary': \"outputs\" (gray-box) estimates the output gradient by CGE; "
                          f"zo.estimator = {estimator_name(cfg)!r} perturbs parameters (set zo.estimator = \"cge\")")
    if cfg.prune.masks_file or (cfg.prune.method != "none" and cfg.prune.sparsity > 0):
        raise ConfigError("config key 'prune.method': masks choose parameters to perturb, and zo.boundary = "
                          "\"outputs\" perturbs none (set prune.method = \"none\", no prune.masks_file)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(value: str) -> str:
    """A TOML basic string that reads back as ``value`` exactly (control characters escaped:
    a run directory whose name holds a newline is stored losslessly)."""
    out = []
    for ch in value:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _flat_items(cfg: Config):
    """(section, key, value) of every setting; a task's options appear as keys of [task]."""
    for section, table in to_dict(cfg).items():
        for key, value in table.items():
            if section == "task" and key == "options":
                for opt in sorted(value):
                    yield section, opt, value[opt]
            else:
                yield section, key, value


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (read back by :func:`from_toml_text`)."""
    lines, current = [], None
    for section, key, value in _flat_items(cfg):
        if section != current:
            if current is not None:
                lines.append("")
            lines.append(f"[{section}]")
            current = section
        lines.append(f"{key} = {_toml_value(value)}")
    lines.append("")
    return "\n".join(lines)


def flat(cfg: Config) -> dict:
    """``{"section.key": value}`` of every setting (task options as ``task.<option>``)."""
    return {f"{s}.{k}": v for s, k, v in _flat_items(cfg)}


def trajectory_changes(stored: Config, current: Config) -> tuple[list[str], list[str]]:
    """Keys that differ between a run's stored config and the current one, split into
    (changes that alter the trajectory, changes a resume may make)."""
    old, new = flat(stored), flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    allowed = [k for k in changed if k in RESUMABLE_CHANGES]
    return [k for k in changed if k not in RESUMABLE_CHANGES], allowed


def from_toml_text(text: str, source: str = "stored config", check_paths: bool = True) -> Config:
    cfg = Config()
    try:
        mapping = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    apply_mapping(cfg, mapping, source)
    if check_paths:
        validate(cfg)
    check_extras(cfg)
    return cfg
