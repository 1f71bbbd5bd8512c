"""Recipes: which stages, in which order, with which parameters (YAML in pipelines/).

A recipe names its stages as a list so the order is explicit::

    name: datacomp_basic
    seed: 0
    stages:
      - stage: ingest
      - stage: filter
        filters: datacomp_basic   # a set in filters/, or an inline list
      - stage: shard

Any value can be overridden with ``--set STAGE.KEY=VALUE`` (the value is YAML),
where STAGE is a stage's ``name`` (default: its kind). Filter parameters are
reached through the filter's name: ``--set filter.image_size.min_side=150``;
in a filter list of another field, through the field too:
``--set bootstrap.train_filters.image_size.min_side=150``. Any stage field typed
``list[Filter]`` is a filter list: a set name or an inline list, read the same
way. The resolved recipe (filter sets inlined, overrides applied, defaults
filled) is what runs, what is hashed for resume, and what is saved in the run
folder.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.core.config import ConfigError, Where, build, load_yaml, params_of, parse_yaml
from curate.core.operators import DEFAULT_SET, FILTERS, Filter, load_registry
from curate.core.runfolder import check_name
from curate.core.stage import STAGES, Stage

REPO_ROOT = Path(__file__).resolve().parents[2]
FILTER_SET_DIRS = [Path.cwd() / "filters", REPO_ROOT / "filters"]
RECIPE_DIRS = [Path.cwd() / "pipelines", REPO_ROOT / "pipelines"]
TOP_KEYS = ("name", "description", "seed", "stages")


@dataclass
class Recipe:
    name: str
    description: str
    seed: int
    stages: list[Stage]  # each with .name set
    source: str

    def resolved(self) -> dict:
        """The recipe as plain data: what runs, what is hashed, what is saved."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "stages": [stage_params(s) for s in self.stages],
        }


def filter_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a stage class that hold a filter list (typed ``list[Filter]``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: f for f in dataclasses.fields(cls) if f.init and hints[f.name] == list[Filter]}


def stage_params(stage: Stage) -> dict:
    """A stage's resolved parameters, starting with its kind and name; filter lists as
    ``[{filter: {params}}]``, so editing a filter's parameter changes the stage's hash."""
    lists = filter_fields(type(stage))
    out: dict[str, Any] = {"stage": stage.kind, "name": stage.name}
    for key, value in params_of(stage).items():
        out[key] = [{f.name: params_of(f)} for f in value] if key in lists else value
    return out


def find_file(name: str, dirs: list[Path], what: str) -> Path:
    """A path as given, or a bare name looked up in the project's folders."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    for folder in dirs:
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"no {what} named {name!r} (known: {', '.join(known) or 'none'})")


def load_filter_set(name: str) -> tuple[list, str]:
    """The filter list of a named set in filters/ (or a path), and where it came from."""
    path = find_file(name, FILTER_SET_DIRS, "filter set")
    data, lines = load_yaml(path)
    if not isinstance(data, dict) or "filters" not in data:
        raise ConfigError(f"{path}: a filter set is a mapping with a 'filters' list")
    unknown = sorted(set(data) - {"filters", "description"})
    if unknown:
        raise ConfigError(f"{path}:{lines[(unknown[0],)]}: unknown key {unknown[0]!r}")
    return data["filters"], f"{path}:{lines.get(('filters',), 1)}"


def build_filters(
    entries: Any, where: str, origins: dict[tuple[str, str], str] | None = None
) -> list[Filter]:
    """Filter objects from a filter list; errors start with ``where``.

    ``origins`` maps (filter name, key) to the place a parameter's value came from
    when that is not ``where`` (a ``--set`` override), so its errors name that place.
    """
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: a filter list is a filter set name or a list")
    origins = origins or {}
    filters, seen = [], set()
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}: filters[{i}] must be `- name: {{params}}`, got {entry!r}")
        ((name, params),) = entry.items()
        if name not in FILTERS:
            raise ConfigError(
                f"{where}: filters[{i}]: unknown filter {name!r} "
                f"(registered: {', '.join(sorted(FILTERS))})"
            )
        if name in seen:
            raise ConfigError(f"{where}: filter {name!r} appears twice")
        seen.add(name)
        keys = {k: f"{o}: filter {name}" for (f, k), o in origins.items() if f == name}
        filters.append(build(FILTERS[name], params, f"{where}: filter {name}", origins=keys))
    return filters


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected STAGE.KEY=VALUE")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text}: empty key component")
    # The value is YAML, read as strictly as a recipe file (no tags, no alias bombs).
    value = parse_yaml(raw, f"--set {text}", lines_in_place=False)[0] if raw.strip() else ""
    return path, value


def _apply_override(data: dict, path: list[str], value: Any, text: str) -> tuple:
    """Write one override into the recipe data; return the key path it wrote."""
    if len(path) == 1:
        if path[0] not in ("seed", "name", "description"):
            raise ConfigError(f"--set {text}: unknown top-level key {path[0]!r}")
        data[path[0]] = value
        return (path[0],)
    stages = data.get("stages") or []
    by_name = {}
    for i, s in enumerate(stages):
        name = s.get("name", s.get("stage")) if isinstance(s, dict) else None
        if isinstance(name, str):
            by_name.setdefault(name, i)
    if path[0] not in by_name:
        raise ConfigError(
            f"--set {text}: no stage named {path[0]!r} (stages: {', '.join(by_name)})"
        )
    index = by_name[path[0]]
    target = stages[index]
    if len(path) == 2:
        target[path[1]] = value
        return ("stages", index, path[1])
    # STAGE.FILTER.KEY reaches the list in ``filters``; STAGE.FIELD.FILTER.KEY any list.
    kind = target.get("stage")
    lists = filter_fields(STAGES[kind]) if isinstance(kind, str) and kind in STAGES else {}
    field, (flt, key) = ("filters", path[1:]) if len(path) == 3 else (path[1], path[2:4])
    if len(path) > 4 or field not in lists:
        if len(path) > 4 or not lists:
            raise ConfigError(f"--set {text}: too many key components")
        raise ConfigError(
            f"--set {text}: stage {path[0]!r} has no filter list {field!r} "
            f"(its filter lists: {', '.join(lists)}; write STAGE.LIST.FILTER.KEY)"
        )
    filters = target.get(field)
    for entry in filters if isinstance(filters, list) else []:
        name = entry if isinstance(entry, str) else next(iter(entry), None)
        if name == flt:
            params = {} if isinstance(entry, str) else entry[name]
            params = dict(params or {})
            params[key] = value
            filters[filters.index(entry)] = {name: params}
            return ("stages", index, field, name, key)
    raise ConfigError(f"--set {text}: stage {path[0]!r} has no filter {flt!r} in {field}")


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Load, resolve and validate a recipe; every error names the file, line or override."""
    load_registry()
    path = find_file(name_or_path, RECIPE_DIRS, "recipe")
    data, lines = load_yaml(path)
    return recipe_from_data(data, lines, str(path), overrides)


def recipe_from_data(data: Any, lines: Where, source: str, overrides: list[str] = ()) -> Recipe:
    """A recipe from already-parsed YAML; ``lines`` maps key paths to lines for errors.

    The whole recipe is checked here, before any work: keys, types and ranges of every
    stage and filter parameter, stage names, and the stage order (``ingest`` first and
    only first, ``shard`` last). An error names the file and line of the value, or the
    ``--set`` override that gave it.
    """
    load_registry()
    overridden: dict[tuple, str] = {}  # key path in the recipe data -> the --set text

    def at(*key) -> str:
        for n in range(len(key), 0, -1):
            if key[:n] in overridden:
                return f"--set {overridden[key[:n]]}"
        return f"{source}:{lines.get(key, lines.get(key[:-1], 1))}"

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a mapping with a 'stages' list")
    unknown = sorted(set(data) - set(TOP_KEYS), key=str)
    if unknown:
        raise ConfigError(
            f"{at(unknown[0])}: unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})"
        )
    data = copy.deepcopy(data)
    parsed = [(_parse_override(o), o) for o in overrides]
    # Stage-level overrides first (they may swap a filter set), then expand sets,
    # then filter-parameter overrides.
    for (path, value), text in parsed:
        if len(path) <= 2:
            overridden[_apply_override(data, path, value, text)] = text
    stages_data = data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        raise ConfigError(f"{at('stages')}: 'stages' must be a non-empty list")
    filter_where: dict[tuple[int, str], str] = {}  # (stage, field) -> the set's file
    for i, entry in enumerate(stages_data):
        kind = entry.get("stage") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in STAGES:
            continue  # reported below
        for key, spec in filter_fields(STAGES[kind]).items():
            if key not in entry and DEFAULT_SET in spec.metadata:
                entry[key] = spec.metadata[DEFAULT_SET]
            if isinstance(entry.get(key), str):
                try:
                    found = find_file(entry[key], FILTER_SET_DIRS, "filter set")
                except ConfigError as exc:
                    raise ConfigError(f"{at('stages', i, key)}: {exc}") from exc
                entry[key], filter_where[i, key] = load_filter_set(str(found))
    for (path, value), text in parsed:
        if len(path) > 2:
            overridden[_apply_override(data, path, value, text)] = text

    stages: list[Stage] = []
    names: set[str] = set()
    for i, entry in enumerate(stages_data):
        where = at("stages", i)
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"{where}: each stage is a mapping with a 'stage' kind")
        params = dict(entry)
        kind = params.pop("stage")
        name = params.pop("name", kind)
        if not isinstance(kind, str) or kind not in STAGES:
            raise ConfigError(
                f"{at('stages', i, 'stage')}: unknown stage {kind!r} "
                f"(known: {', '.join(sorted(STAGES))})"
            )
        try:  # it names the stage's folders and its --set NAME.KEY overrides
            check_name(name, "stage name")
        except ConfigError as exc:
            raise ConfigError(f"{at('stages', i, 'name')}: {exc}") from None
        if name in names:
            raise ConfigError(f"{where}: two stages are named {name!r}; give one a 'name'")
        names.add(name)
        if (i == 0) != (kind == "ingest"):
            raise ConfigError(
                f"{where}: the first stage must be 'ingest'"
                if i == 0
                else f"{where}: stage {name}: ingest is the first stage, and only the first"
            )
        if stages and stages[-1].kind == "shard":
            raise ConfigError(
                f"{where}: stage {name} comes after the shard stage {stages[-1].name!r}: "
                "shard must be the last stage (it writes what the run hands on)"
            )
        what = f"{where}: stage {name}"
        known = {f.name for f in dataclasses.fields(STAGES[kind]) if f.init}
        for key in params:
            if key not in known:
                raise ConfigError(
                    f"{at('stages', i, key)}: stage {name}: unknown key {key!r} "
                    f"(known keys: {', '.join(sorted(known)) or 'none'})"
                )
        origins = {
            key: f"{at('stages', i, key)}: stage {name}"
            for key in params
            if ("stages", i, key) in overridden
        }
        lists = {}
        for key in filter_fields(STAGES[kind]):
            if key not in params:
                raise ConfigError(f"{what}: missing required key {key!r}")
            lists[key] = build_filters(
                params.pop(key),
                filter_where.get((i, key), at("stages", i, key)),
                {
                    (path[3], path[4]): f"--set {text}"
                    for path, text in overridden.items()
                    if len(path) == 5 and path[:3] == ("stages", i, key)
                },
            )
        stage = build(STAGES[kind], params, what, skip=tuple(lists), origins=origins)
        for key, filters in lists.items():
            setattr(stage, key, filters)
        stage.name = name
        stages.append(stage)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        # numpy takes no negative seed, FAISS's k-means none of 2**31 or more
        raise ConfigError(f"{at('seed')}: seed must be an integer from 0 to 2**31 - 1: {seed!r}")
    for key in ("name", "description"):
        if isinstance(data.get(key), list | dict):
            raise ConfigError(f"{at(key)}: {key} must be text, got {data[key]!r}")
    return Recipe(
        name=str(data.get("name") or Path(source).stem),
        description=str(data.get("description") or ""),
        seed=seed,
        stages=stages,
        source=source,
    )
