"""Experiment configurations: load, validate against a script's `Args`, expand to runs.

A configuration is one YAML file in `experiment_configs/`; its name (the file stem) names the
sweep. Every key is checked before anything starts:

    description: CartPole, sequence length × burn-in      # optional, free text
    script: r2d2_algo/r2d2.py        # the variant to run, relative to the repository root
                                     #   (a bare name, r2d2_mp.py, is looked for in r2d2_algo/)
    seeds: 2                         # 2 → seeds 1, 2; or a list: [1, 5, 7]   (default: 1)
    args:                            # the same for every run: fields of the script's Args
      env_id: CartPole-v1            #   (snake_case or --kebab-case names)
      total_timesteps: 40000
      progress_bar: false            #   booleans become --flag / --no-flag
    grid:                            # each list is one axis; runs are the cross product
      burn_in_length: [0, 8]
      sequence_length,overlap: [[8, 4], [16, 8]]   # linked arguments: one axis, values together
    slots: 3                         # optional: cores one run occupies (default: 1, or
                                     #   num_actors + 1 when Args has num_actors)

Each run gets a deterministic id from the config name, its grid point and its seed; the
scheduler passes `--exp-name {config}-{key}={value}-...` and `--seed`, so the run's tensorboard
folder is `runs/{env_id}__{exp_name}__{seed}__{unix_time}`. The scheduler's record of each run
(state, exit code, log, run folder, config values) is a JSON file under `runs/_scheduler/`,
next to the results it describes; `read_records` reads them back (for `analysis.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_KEYS = ("description", "script", "seeds", "args", "grid", "slots")
SCHEDULER_FIELDS = ("exp_name", "seed")  # set for each run by the scheduler, never by a config
STATE_DIR = "_scheduler"  # under runs/: one folder per config, a .json record and a .log per run
SCRIPTS_DIR = "r2d2_algo"  # where a bare script name is looked for
MAX_EXP_NAME = 100  # longer grid-point names are shortened to a hash


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line: `file: key: problem`."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: a script, a grid point and a seed."""

    run_id: str
    """unique and deterministic: `{exp_name}__{seed}`; names the record and log files"""
    config_name: str
    config_path: str
    script: str
    exp_name: str
    seed: int
    values: dict
    """every value the config sets for this run (args, grid point, seed), snake_case names"""
    grid_point: dict
    argv: tuple
    """the script's command-line arguments (without the interpreter and script path)"""
    slots: int
    """cores the run occupies in the scheduler's budget"""

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, self.script, *self.argv]

    def run_dir_glob(self, runs_dir: str | Path = "runs") -> str:
        """Glob of the run's tensorboard folder(s): `runs/*__{exp_name}__{seed}__*`."""
        return str(Path(runs_dir) / f"*__{self.exp_name}__{self.seed}__*")


# ---------------------------------------------------------------------------------------------
# the script's Args


_ARGS_CACHE: dict[tuple[str, float], type] = {}


def script_args_class(script: str | Path) -> type:
    """The `Args` dataclass of a script, imported from its path (the script's `main` is not run).

    Raises:
        ImportError: the script cannot be imported or defines no dataclass `Args`.
    """
    path = Path(script).resolve()
    key = (str(path), path.stat().st_mtime)
    if key not in _ARGS_CACHE:
        name = "_experiment_script_" + hashlib.sha1(str(path).encode()).hexdigest()[:10] + "_" + path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and tyro resolve string annotations through it
        try:
            spec.loader.exec_module(module)
        except BaseException as e:  # noqa: BLE001  (a script may sys.exit at import)
            del sys.modules[name]
            raise ImportError(f"cannot import {script}: {type(e).__name__}: {e}") from e
        args_cls = getattr(module, "Args", None)
        if not (isinstance(args_cls, type) and dataclasses.is_dataclass(args_cls)):
            raise ImportError(f"{script} defines no dataclass Args")
        _ARGS_CACHE[key] = args_cls
    return _ARGS_CACHE[key]


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def to_argv(values: dict) -> list[str]:
    """Command-line arguments of tyro for field values: `--name value`, `--flag`/`--no-flag`,
    `--name v1 v2` for lists, `--name key:value ...` for a mapping (`env_kwargs: {memory_length: 30}`;
    each value written as JSON, which YAML reads back as the same value)."""
    argv = []
    for name, value in values.items():
        if isinstance(value, dict):
            argv += [flag(name), *(f"{key}:{json.dumps(item)}" for key, item in value.items())]
        elif isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag(name), *map(str, value)]
        else:
            argv += [flag(name), str(value)]
    return argv


def parse_args(args_cls: type, argv: list[str]):
    """tyro's parse of argv into args_cls (its messages silenced); ValueError if it refuses argv."""
    import tyro

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return tyro.cli(args_cls, args=argv)
    except SystemExit:
        raise ValueError(f"tyro refuses {' '.join(argv)}") from None


def type_name(field: dataclasses.Field) -> str:
    """The field's annotation as written in the script (``int``, ``Literal['lstm', 'gru', 'none']``)."""
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))


# ---------------------------------------------------------------------------------------------
# loading and validation


def _normalise(section: dict, where: str, path: str) -> dict:
    out = {}
    for key in section:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: {where}.{key}: keys must be argument names")
        name = key.lstrip("-").replace("-", "_")
        if name in out:
            raise ConfigError(f"{path}: {where}.{key}: given twice (as {name} and {key})")
        out[name] = section[key]
    return out


def _check_name(name: str, where: str, fields: dict, script: str, path: str) -> None:
    if name in SCHEDULER_FIELDS:
        hint = "list seeds under `seeds:`" if name == "seed" else "the config's file name names the experiment"
        raise ConfigError(f"{path}: {where}.{name}: set by the scheduler for each run ({hint})")
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean {flag(close[0])}?)" if close else ""
        raise ConfigError(f"{path}: {where}.{name}: {script} has no argument {flag(name)}{hint}")


def _slug(value: Any) -> str:
    if isinstance(value, dict):
        return "_".join(f"{_slug(k)}={_slug(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "_".join(map(_slug, value))
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


def exp_name_of(config_name: str, grid_point: dict) -> str:
    """`{config}-{key}={value}-...` (deterministic; a hash when it would be too long)."""
    if not grid_point:
        return config_name
    name = "-".join([config_name] + [f"{k}={_slug(v)}" for k, v in grid_point.items()])
    if len(name) > MAX_EXP_NAME:
        digest = hashlib.sha1(json.dumps(grid_point, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{config_name}-{digest}"
    return name


def validate_config(config: Any, path: str = "<config>", root: str | Path = ".") -> list[Run]:
    """Check a parsed configuration against its script's Args and expand it to runs.

    Args:
        config: the YAML mapping (see the module docstring).
        path: the file it came from (its stem names the sweep; named in every error).
        root: folder the script path is relative to, and the scripts' working directory.
    Returns:
        the runs, seed-major (every grid point of seed 1, then of seed 2, ...), so that a
        sweep stopped half-way covers the whole grid.
    Raises:
        ConfigError: `file: key: problem` for the first problem found.
    """
    name = Path(path).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name) or "__" in name:
        raise ConfigError(f"{path}: the file name must be letters, digits, _ . + - (no '__'): {name!r}")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping with keys {', '.join(CONFIG_KEYS)}")
    for key in config:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (expected one of {', '.join(CONFIG_KEYS)})"
            raise ConfigError(f"{path}: {key}: unknown key{hint}")

    script = config.get("script")
    if not isinstance(script, str) or not script:
        raise ConfigError(f"{path}: script: missing (the script to run, e.g. r2d2_algo/r2d2.py)")
    if not (Path(root) / script).is_file():
        if not (Path(root) / SCRIPTS_DIR / script).is_file():
            raise ConfigError(f"{path}: script: {script} not found")
        script = f"{SCRIPTS_DIR}/{script}"  # `r2d2_mp.py` names r2d2_algo/r2d2_mp.py
    try:
        args_cls = script_args_class(Path(root) / script)
    except ImportError as e:
        raise ConfigError(f"{path}: script: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    for needed in SCHEDULER_FIELDS:
        if needed not in fields:
            raise ConfigError(f"{path}: script: {script}'s Args has no {needed} field (the scheduler sets it)")

    for section in ("args", "grid"):
        if not isinstance(config.get(section) or {}, dict):
            raise ConfigError(f"{path}: {section}: must be a mapping of argument names to values")
    args = _normalise(config.get("args") or {}, "args", path)
    for key in args:
        _check_name(key, "args", fields, script, path)
    axes = []  # (names, entries): one grid axis; an entry gives a value to each name
    seen: set[str] = set()
    for key, values in (config.get("grid") or {}).items():
        names = [n.strip().lstrip("-").replace("-", "_") for n in str(key).split(",")]
        label = ",".join(names)
        for n in names:
            _check_name(n, "grid", fields, script, path)
            if n in args:
                raise ConfigError(f"{path}: grid.{n}: also set in args (give it in one place)")
            if n in seen:
                raise ConfigError(f"{path}: grid.{n}: in two grid axes")
            seen.add(n)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{label}: must be a non-empty list of values, got {values!r}")
        if len(names) > 1:  # linked arguments: `sequence_length,overlap: [[8, 4], [16, 8]]`
            for v in values:
                if not isinstance(v, list) or len(v) != len(names):
                    raise ConfigError(f"{path}: grid.{label}: each entry must be a list of {len(names)} values "
                                      f"(one per argument), got {v!r}")
        entries = [tuple(v) if len(names) > 1 else (v,) for v in values]
        for i, entry in enumerate(entries):
            if entry in entries[:i]:
                raise ConfigError(f"{path}: grid.{label}: repeats the value {values[i]!r}")
        axes.append((names, entries))
    grid_values = {n: [entry[i] for entry in entries] for names, entries in axes for i, n in enumerate(names)}

    seeds = config.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"{path}: seeds: must be >= 1 (a count) or a list of seeds, got {seeds}")
        seeds = list(range(1, seeds + 1))
    elif not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds)):
        raise ConfigError(f"{path}: seeds: must be a count or a non-empty list of integers, got {seeds!r}")
    elif len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds: repeats a seed: {seeds}")

    # tyro parses each value alone (plus any required fields), so a refusal names its key and value
    required = {n: args.get(n, (grid_values.get(n) or [dataclasses.MISSING])[0]) for n, f in fields.items()
                if field_default(f) is dataclasses.MISSING and n not in SCHEDULER_FIELDS}
    for n, v in required.items():
        if v is dataclasses.MISSING:
            raise ConfigError(f"{path}: args.{n}: {script} requires {flag(n)}")
    base = to_argv(required) + to_argv({"exp_name": "x", "seed": 1})
    checks = [("args", k, v) for k, v in args.items()] + [("grid", k, v) for k, vs in grid_values.items() for v in vs]
    for section, key, value in checks:
        try:
            parse_args(args_cls, base + to_argv({key: value}))
        except ValueError:
            raise ConfigError(f"{path}: {section}.{key}: {value!r} is not a valid value of {flag(key)} "
                              f"({type_name(fields[key])})") from None

    slots = config.get("slots")
    if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
        raise ConfigError(f"{path}: slots: must be an integer >= 1, got {slots!r}")

    check_args = getattr(sys.modules[args_cls.__module__], "check_args", None)
    checked_env_ids = set()
    runs = []
    for seed in seeds:
        for point in itertools.product(*(entries for _, entries in axes)):
            grid_point = {n: v for (names, _), entry in zip(axes, point) for n, v in zip(names, entry)}
            exp_name = exp_name_of(name, grid_point)
            values = {**args, **grid_point}
            argv = to_argv({"exp_name": exp_name, "seed": seed, **values})
            parsed = parse_args(args_cls, argv)
            run_id = f"{exp_name}__{seed}"
            if callable(check_args):  # the script's own consistency checks (r2d2.py has one)
                try:
                    check_args(parsed)
                except ValueError as e:
                    raise ConfigError(f"{path}: run {run_id}: {e}") from None
            env_id, env_kwargs = getattr(parsed, "env_id", None), tuple(getattr(parsed, "env_kwargs", ()))
            if isinstance(env_id, str) and (env_id, env_kwargs) not in checked_env_ids:  # built and reset once
                from r2d2_algo.envs import check_env_id

                try:
                    check_env_id(env_id, quiet=True, env_kwargs=env_kwargs)
                except ValueError as e:
                    raise ConfigError(f"{path}: run {run_id}: --env-id: {e}") from None
                checked_env_ids.add((env_id, env_kwargs))
            actors = getattr(parsed, "num_actors", None)  # r2d2_mp.py: actor processes + the learner
            run_slots = slots if slots is not None else actors + 1 if isinstance(actors, int) else 1
            runs.append(Run(run_id=run_id, config_name=name, config_path=str(path), script=script,
                            exp_name=exp_name, seed=seed, values={**values, "seed": seed}, grid_point=grid_point,
                            argv=tuple(argv), slots=int(run_slots)))
    return runs


def load_config(path: str | Path, root: str | Path = ".") -> list[Run]:
    """Read, validate and expand one YAML configuration (see `validate_config`)."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    return validate_config(config, str(path), root)


def config_paths(config_dir: str | Path = "experiment_configs") -> list[Path]:
    """The configurations of a folder: *.yaml and *.yml, sorted by name."""
    return sorted(p for p in Path(config_dir).iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_configs(paths: list[str | Path], root: str | Path = ".") -> list[Run]:
    """All runs of several configurations, in file order; every file is validated first."""
    runs, seen = [], {}
    for path in paths:
        for run in load_config(path, root):
            if run.run_id in seen:
                raise ConfigError(f"{path}: run {run.run_id} is also in {seen[run.run_id]} (rename one file)")
            seen[run.run_id] = path
            runs.append(run)
    return runs


class _ConfigDumper(yaml.SafeDumper):
    """Mappings as blocks, lists on one line: `sequence_length,overlap: [[8, 4], [16, 8]]`."""


_ConfigDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def write_config(path: str | Path, script: str, args: dict | None = None, grid: dict | None = None,
                 seeds: int | list[int] = 1, description: str = "", slots: int | None = None,
                 root: str | Path = ".") -> list[Run]:
    """Validate a configuration, then write it as YAML (nothing is written if it is refused).

    Returns the runs it expands to. Raises ConfigError like `validate_config`."""
    config = {"description": description} if description else {}
    config.update(script=script, seeds=seeds, args=dict(args or {}), grid=dict(grid or {}))
    if slots is not None:
        config["slots"] = slots
    config = json.loads(json.dumps(config))  # tuples → lists, as YAML would read them back
    runs = validate_config(config, str(path), root)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        f.write(f"# {len(runs)} runs; written by write_experiments.ipynb, run with `python scheduler.py`\n")
        yaml.dump(config, f, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True, width=100)
    os.replace(tmp, path)
    return runs


# ---------------------------------------------------------------------------------------------
# the scheduler's records (runs/_scheduler/{config}/{run_id}.json)


def state_dir(runs_dir: str | Path = "runs") -> Path:
    return Path(runs_dir) / STATE_DIR


def record_path(run: Run, runs_dir: str | Path = "runs") -> Path:
    return state_dir(runs_dir) / run.config_name / f"{run.run_id}.json"


def log_path(run: Run, runs_dir: str | Path = "runs") -> Path:
    return state_dir(runs_dir) / run.config_name / f"{run.run_id}.log"


def read_record(path: str | Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_record(path: str | Path, record: dict) -> None:
    """Write atomically (temp file + rename): a reader never sees half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(runs_dir: str | Path = "runs", configs: list[str] | None = None) -> list[dict]:
    """Every record the scheduler wrote under runs/_scheduler/ (optionally of some configs only)."""
    root = state_dir(runs_dir)
    if not root.is_dir():
        return []
    records = []
    for path in sorted(root.glob("*/*.json")):
        if configs is None or path.parent.name in configs:
            record = read_record(path)
            if record is not None:
                records.append(record)
    return records
