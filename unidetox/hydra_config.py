"""Compose a recipe's Hydra config and hand it to HF dataclasses.

Recipes use Hydra's compose API rather than ``@hydra.main``: no time-stamped run dirs, no ``chdir``, no
multirun (which must not happen under ``accelerate launch``), and no logging takeover. Each recipe has a
primary config ``conf/<recipe>.yaml``; groups shared by all recipes live in ``conf/`` (``model/``), and groups
that belong to one recipe in ``conf/<recipe>/`` (added to the search path), so ``experiment=embedded_smollm2``
means the distill experiment in the distill recipe and the detox experiment in the detox recipe.

The hand-off is strict, so that a typo fails at once with the key in the message: every field of a section's
dataclass (:mod:`unidetox.config_keys`) is set as ``section.field=value`` whether the YAML lists it or not, any other
key that no config defines is rejected naming its section and the nearest valid names (a key added with ``+`` is
checked by the dataclass of its section, the same way), an unknown group option names the nearest options, and every
value is converted to its field's annotated type where that loses nothing, or rejected. No error echoes a secret: the value of a secret key is masked wherever an override is quoted.

Hydra and OmegaConf are imported inside the functions that use them: importing unidetox and its stages, ``unidetox
--help``, and a stage's ``run(args)`` with arguments built in Python never import Hydra. hydra-core is nevertheless a
required dependency, since the command line and the recipes compose every config with it.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import tempfile
import types
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from unidetox.config_keys import section_fields, type_name
from unidetox.paths import default_data_dir
from unidetox.processes import is_main_process
from unidetox.run_dir import CONFIG_FILE
from unidetox.secret_masking import MASK, is_secret_key, mask_secrets, mask_text

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped in the package, so the CLI works from a wheel
DATA_DIR_KEY = "data_dir"  # the top-level key holding the shared data folder, which the configs interpolate
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# recipe -> its groups whose value may be any hub id, path or embedded name besides a preset (model=...)
FREE_FORM_GROUPS = {"distill": ("model",), "detox": ("model",)}


def _rewrite_free_form_overrides(overrides: Sequence[str], conf_dirs: Sequence[Path],
                                 free_form_groups: Sequence[str]) -> list[str]:
    """``model=meta-llama/Llama-2-7b-hf`` -> ``model.name_or_path=...`` when no ``<dir>/model/<value>.yaml`` exists
    in any of ``conf_dirs``.

    This lets one override take a preset (``model=gemma3-270m``) or any hub id, local path or embedded name.
    """
    rewritten = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if (sep and key in free_form_groups and value
                and not any((d / key / f"{value}.yaml").is_file() for d in conf_dirs)):
            override = f"{key}.name_or_path={value}"
        rewritten.append(override)
    return rewritten


def _rewrite_dataclass_field_overrides(overrides: Sequence[str], parsed, known_fields: Mapping[str, Any]) -> list[str]:
    """``trainer.report_to=[x]`` -> ``++trainer.report_to=[x]`` when ``report_to`` is a field of the ``trainer``
    section's dataclass: every field can be set as ``section.field=value``, listed in the YAML or not, while a key
    that is no field (a typo) still fails as unknown. ``known_fields`` maps each section to its fields
    (:func:`unidetox.config_keys.section_fields`); ``parsed`` are Hydra's parses of ``overrides``, in order.
    """
    from hydra.core.override_parser.types import OverrideType

    rewritten = []
    for override, parse in zip(overrides, parsed, strict=True):
        section, _, key = parse.key_or_group.rpartition(".")
        if parse.type is OverrideType.CHANGE and parse.package is None and key in known_fields.get(section, ()):
            override = f"++{override}"
        rewritten.append(override)
    return rewritten


def split_config_dirs(overrides: Sequence[str]) -> tuple[list[str], list[Path]]:
    """The overrides without ``--config-dir DIR`` / ``--config-dir=DIR``, and those directories (each must exist).

    A user's config folder holds groups like the shipped ones (``DIR/recipe/NAME.yaml``, ``DIR/trainer/NAME.yaml``,
    ``DIR/model/NAME.yaml``); it is searched before the shipped configs, so ``recipe=NAME`` finds the user's file.

    >>> split_config_dirs(["--config-dir", ".", "recipe=mine", "--config-dir=."])[0]
    ['recipe=mine']
    """
    kept, dirs, items = [], [], iter(overrides)
    for override in items:
        if override == "--config-dir":
            value = next(items, None)
            if value is None:
                raise ValueError("`--config-dir` needs a directory after it: --config-dir DIR.")
        elif override.startswith("--config-dir="):
            value = override.partition("=")[2]
        else:
            kept.append(override)
            continue
        if not Path(value).is_dir():
            raise FileNotFoundError(f"--config-dir {value}: no such directory; pass a folder holding your configs "
                                    "in group folders (e.g. DIR/recipe/NAME.yaml).")
        dirs.append(Path(value).resolve())
    return kept, dirs


def _link_config_files(overrides: Sequence[str], group_dirs: Sequence[Path], link_dir: Path) -> list[str]:
    """``recipe=PATH/NAME.yaml`` (any config group, a value ending in .yaml) -> ``recipe=NAME``, with the file linked
    as ``link_dir/recipe/NAME.yaml`` (searched first): a config file anywhere is chosen like a shipped option."""
    rewritten = []
    for override in overrides:
        group, sep, value = override.partition("=")
        if sep and value.endswith((".yaml", ".yml")) and any((d / group).is_dir() for d in group_dirs):
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{group}={value}: no such config file; pass the path of a YAML file or the "
                                        f"name of a {group} option.")
            (link_dir / group).mkdir(parents=True, exist_ok=True)
            (link_dir / group / f"{path.stem}.yaml").symlink_to(path.resolve())
            override = f"{group}={path.stem}"
        rewritten.append(override)
    return rewritten


def _hydra_quoted(value) -> str:
    """``value`` as a double-quoted Hydra override value, in which '=', spaces and brackets are plain text."""
    return '"' + str(value).replace('"', '\\"') + '"'


def _list_items(inner: str) -> list[str]:
    """The items of a list value's text between its brackets, split at the commas outside quotes and brackets."""
    items, depth, quote, current = [], 0, None, ""
    for char in inner:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    return [*items, current.strip()] if current.strip() or items else items


def quoting_advice(override: str) -> str:
    """How to write ``override`` so that Hydra parses it: the value, or each item of a list value, double-quoted
    inside shell single quotes.

    >>> print(quoting_advice("test.overrides=[scorer=perspective,eval.num_samples=2]"))
    'test.overrides=["scorer=perspective","eval.num_samples=2"]'
    """
    key, _, value = override.partition("=")
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        items = [item if item[:1] in "'\"" and item[-1:] == item[:1] else _hydra_quoted(item)
                 for item in _list_items(value[1:-1])]
        return f"'{key}=[{','.join(items)}]'"
    return f"'{key}={_hydra_quoted(value)}'"


def _override_is_secret(override: str) -> bool:
    return is_secret_key(override.partition("=")[0].lstrip("+~").split(".")[-1])


def _shown(override: str) -> str:
    """``override`` as an error may quote it: the whole value of a secret key masked, and secrets inside a value."""
    return f"{override.partition('=')[0]}={MASK}" if _override_is_secret(override) else mask_text(override)


def _parse_overrides(overrides: Sequence[str]):
    """Hydra's parsed overrides; a ``ValueError`` naming the one Hydra's grammar rejects and how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        secret = _override_is_secret(err.override)
        advice = (quoting_advice(f"{err.override.partition('=')[0]}=<the value>") if secret
                  else mask_text(quoting_advice(err.override)))
        fix = ("a value holding '=', spaces, brackets or commas has to be quoted: pass "
               f"{advice} (shell single quotes around, double quotes inside)"
               if "=" in err.override else "overrides are key=value")
        # Hydra's message quotes pieces of the value: none of a secret's.
        hydra_says = "(left out: it may quote the secret)" if secret else mask_text(str(err))
        raise ValueError(f"Cannot parse the override {_shown(err.override)!r}: {fix}.\nHydra says: {hydra_says}"
                         ) from None


def _top_key(override) -> str:
    return override.key_or_group.split(".")[0]


def _adds_to_top_level(override, group_dirs: Sequence[Path]) -> bool:
    """True for ``+key...=``/``++key...=`` overrides that may create a top-level key (not a group, not Hydra's)."""
    key = override.key_or_group
    if not (override.is_add() or override.is_force_add()) or "/" in key or _top_key(override) in ("hydra", DATA_DIR_KEY):
        return False
    return "." in key or not any((d / key).is_dir() for d in group_dirs)


def compose_config(
    recipe: str,
    overrides: Sequence[str] = (),
    conf_dir: str | os.PathLike | None = None,
    free_form_groups: Sequence[str] | None = None,
):
    """Compose ``conf/<recipe>.yaml`` with command-line style ``overrides`` and return a resolved DictConfig.

    ``--config-dir DIR`` among the overrides adds a folder of the user's configs, searched before the shipped ones
    (:func:`split_config_dirs`); a group given a YAML file path (``recipe=PATH.yaml``) takes that file as its option.
    ``data_dir`` defaults to :func:`unidetox.paths.default_data_dir` (``$UNIDETOX_DATA_DIR``) unless overridden;
    without either it raises :class:`~unidetox.paths.DataDirNotSet` naming both. Raises ``ValueError`` for an
    override Hydra cannot parse (saying how to quote it) and for a key that no config defines (naming its section
    and the nearest valid names); no such error quotes a secret value. ``free_form_groups`` (default: the recipe's
    :data:`FREE_FORM_GROUPS`) take any value besides their presets.
    """
    conf_dir = Path(conf_dir) if conf_dir is not None else CONF_DIR
    conf_dir = conf_dir.resolve()
    if not (conf_dir / f"{recipe}.yaml").is_file():
        raise FileNotFoundError(f"No primary config {conf_dir / (recipe + '.yaml')}; pass conf_dir=...")
    overrides, user_dirs = split_config_dirs(overrides)
    with tempfile.TemporaryDirectory(prefix="unidetox-configs-") as link_dir:
        group_dirs = [Path(link_dir), *user_dirs, conf_dir / recipe, conf_dir]
        return _compose(recipe, overrides, conf_dir, free_form_groups, group_dirs)


def _compose(recipe: str, overrides: Sequence[str], conf_dir: Path, free_form_groups: Sequence[str],
             group_dirs: list[Path]):
    """:func:`compose_config` once the search path is known: ``group_dirs``, the first searched first."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    parsed = _parse_overrides(overrides)
    if free_form_groups is None:
        free_form_groups = FREE_FORM_GROUPS.get(recipe, ())
    overrides = _link_config_files(overrides, group_dirs, group_dirs[0])
    overrides = _rewrite_free_form_overrides(overrides, group_dirs, free_form_groups)
    known_fields = section_fields(recipe)
    # The shared data folder is a top-level key of every recipe (set below unless given), listed in its YAML or not.
    settable = {**known_fields, "": {*known_fields.get("", ()), DATA_DIR_KEY}}
    overrides = _rewrite_dataclass_field_overrides(overrides, parsed, settable)
    search_path = [d for d in group_dirs[:-1] if d.is_dir()]  # the last is the primary config dir itself
    extra = [f"hydra.searchpath=[{','.join(_hydra_quoted(f'file://{d}') for d in search_path)}]"]
    if not any(o.key_or_group == DATA_DIR_KEY for o in parsed):
        extra.append(f"++{DATA_DIR_KEY}={_hydra_quoted(default_data_dir())}")
    additions = {i for i, o in enumerate(parsed) if _adds_to_top_level(o, group_dirs)}
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=recipe):
        try:
            cfg = compose(config_name=recipe, overrides=extra + overrides)
        except ConfigCompositionException as err:
            def compose_without(culprit):
                kept = [o for o, p in zip(overrides, parsed, strict=True) if p is not culprit]
                return compose(config_name=recipe, overrides=extra + kept)
            raise (_unknown_key_error(err, parsed, compose_without, known_fields, recipe)
                   or _missing_option_error(err) or ValueError(mask_text(str(err)))) from None
        if additions:  # the top-level keys the configs define: the same composition without those additions
            known = set(compose(config_name=recipe,
                                overrides=extra + [o for i, o in enumerate(overrides) if i not in additions]))
            unknown = [f"{_top_key(parsed[i])!r} (from {_shown(parsed[i].input_line)!r})" for i in sorted(additions)
                       if _top_key(parsed[i]) not in known]
            if unknown:
                raise ValueError(
                    f"Unknown top-level config key {', '.join(unknown)}: no {recipe} config defines it, so the recipe "
                    f"would ignore it. The known top-level keys are {', '.join(sorted(known))}; set a field under "
                    "one of them (section.field=value) or drop the override."
                )
    OmegaConf.resolve(cfg)
    return cfg


def _did_you_mean(key: str, names) -> str:
    close = difflib.get_close_matches(key, [str(n) for n in names], n=3, cutoff=0.6)
    return f"did you mean {' or '.join(close)}?" if close else "no known key is close."


def _missing_option_error(err) -> ValueError | None:
    """Hydra's "Could not find 'trainer/papr'" (with its search path) as one line naming the group, the nearest
    options and all of them (None for Hydra's other errors)."""
    from hydra.errors import MissingConfigException

    if not isinstance(err, MissingConfigException) or not err.options or not err.missing_cfg_file:
        return None
    group, _, option = str(err.missing_cfg_file).rpartition("/")
    return ValueError(f"Unknown option {option!r} of config group {group!r}: {_did_you_mean(option, err.options)} "
                      f"The options of {group} are {', '.join(sorted(err.options))}.")


def _unknown_key_error(err, parsed, compose_without, known_fields: Mapping[str, Any], recipe: str) -> ValueError | None:
    """Hydra's "Could not override" for a key that is not in the config, as one error naming the section, the key
    and the nearest valid names: the section's keys, and the fields of its dataclass (``known_fields``) where it has
    one (None for Hydra's other errors)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not getattr(cause, "full_key", None):
        return None
    full_key = str(cause.full_key)
    # foo.bar=1 fails at foo when the config has no foo
    culprit = next((o for o in parsed if o.key_or_group == full_key or o.key_or_group.startswith(full_key + ".")),
                   None)
    if culprit is None:
        return None
    section_name, _, key = full_key.rpartition(".")
    section = OmegaConf.select(compose_without(culprit), section_name) if section_name else compose_without(culprit)
    names = sorted(str(k) for k in section) if OmegaConf.is_dict(section) else []
    where, keys = (f"in section {section_name!r}", f"the keys of {section_name}") if section_name else (
        "at the top level", "the top-level keys")
    shown = _shown(culprit.input_line)
    if section_name in known_fields:
        names = sorted({*names, *known_fields[section_name]})
        listed = ", ".join(names) if len(names) <= 40 else f"listed by `unidetox {recipe} --help {section_name}` ({len(names)} keys)"
        return ValueError(f"Unknown config key {key!r} {where} (from {shown!r}): {_did_you_mean(key, names)} "
                          f"{keys.capitalize()} are {listed}.")
    adding = (f" A field of the section's dataclass that the config does not list is set with a leading '+' "
              f"(+{shown.lstrip('+')})." if section_name else "")
    return ValueError(
        f"Unknown config key {key!r} {where} (from {shown!r}): {_did_you_mean(key, names)} "
        f"{keys.capitalize()} are {', '.join(names) or 'none'}.{adding}"
    )


def to_container(section) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section or {})


def _mismatch(key: str, value, annotation) -> ValueError:
    shown = MASK if is_secret_key(key.split(".")[-1].split("[")[0]) else repr(value)
    return ValueError(f"{key}={shown}: expected {type_name(annotation)}, got {type(value).__name__}. Set {key} "
                      "to a value of that type (a string that looks like a number or a bool: quote it).")


def _is_exactly(value, annotation) -> bool:
    """``value`` already has the type ``annotation`` names (``True`` is no int, ``5`` is no float)."""
    if annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(annotation))
    kind = get_origin(annotation) or annotation
    return isinstance(kind, type) and isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def _coerced(value, annotation, key: str, shown=None):
    """``value`` converted to ``annotation`` where that loses nothing, else a ``ValueError`` naming ``key``.

    Checks bool, int, float, str, enums, ``Literal``, ``list[X]``, ``dict[K, V]`` and unions of them; any other
    annotation (and ``None``, which the dataclass judges itself) leaves the value as it is. ``shown`` is the
    annotation an error names (the whole ``X | None`` rather than ``X``).
    """
    shown = annotation if shown is None else shown
    origin, args = get_origin(annotation), get_args(annotation)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        return _coerced_to_union(value, [a for a in args if a is not type(None)], key, shown)
    if origin is Literal:
        if _is_exactly(value, annotation):
            return value
        raise _mismatch(key, value, shown)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            raise _mismatch(key, value, shown) from None
    if isinstance(annotation, type) and annotation in _SCALAR_COERCIONS:
        converted = _SCALAR_COERCIONS[annotation](value)
        if converted is _NO_FIT:
            raise _mismatch(key, value, shown)
        return converted
    if (origin or annotation) is list:
        item = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            return [_coerced(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (str, int, float)):  # one item: a list of it
            return [_coerced(value, item, key)]
        raise _mismatch(key, value, shown)
    if (origin or annotation) in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _mismatch(key, value, shown)
        item = args[1] if len(args) == 2 else Any
        return {k: _coerced(v, item, f"{key}.{k}") for k, v in value.items()}
    return value


def _coerced_to_union(value, members: list, key: str, shown):
    """:func:`_coerced` for a union of ``members`` (``None`` left out): a value of one member stays as it is, else
    the first member it converts to takes it (one that cannot be checked takes any value)."""
    if len(members) == 1:
        return _coerced(value, members[0], key, shown)
    if any(_is_exactly(value, m) for m in members):
        return value
    for member in members:
        try:
            return _coerced(value, member, key)
        except ValueError:
            continue
    raise _mismatch(key, value, shown)


_NO_FIT = object()  # what a scalar conversion returns for a value that does not fit its type


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    return _NO_FIT


def _to_int(value):
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = _float_or_none(value)
    if isinstance(number, int) and not isinstance(number, bool):
        return number
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return _NO_FIT


def _to_float(value):
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = _float_or_none(value)
    # An int stays an int: it is a valid float, and TrainingArguments' float step fields (a ratio below 1)
    # count steps as ints (save_steps=1 is one step, not 1.0).
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        return number
    return _NO_FIT


def _to_str(value):
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _NO_FIT


# annotation -> its lossless conversion (the value, converted, or _NO_FIT)
_SCALAR_COERCIONS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _float_or_none(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _reject_nan(value, key: str) -> None:
    """NaN is never a valid config number (it passes every ``<``/``>`` check); infinity is."""
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{key}={value!r}: NaN is not a valid config number. Set {key} to a number (inf is allowed).")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _reject_nan(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_nan(v, f"{key}[{i}]")


def parse_sections(cfg, sections: Mapping[str, type]) -> dict[str, Any]:
    """``{name: parse_dataclass(cfg.name, type, name=name)}`` for each config section named in ``sections`` (a
    section the config lacks gets its dataclass's defaults): how every stage's ``parse_args`` reads its sections.
    """
    return {name: parse_dataclass(cfg.get(name) or {}, kind, name=name) for name, kind in sections.items()}


def parse_dataclass(section, dataclass_type, *, name: str | None = None):
    """Build an HF-style dataclass (``TrainingArguments`` subclasses included) from a config section.

    Each value is first converted to its field's annotated type where that loses nothing (``"5"`` -> 5 for an
    int, 5 -> 5.0 for a float, ``"true"`` -> True for a bool); a value that does not fit, and NaN anywhere, raise
    ``ValueError`` naming ``<name>.<field>`` (pass the section's ``name``; without it the bare field name), and so
    does a key that is no field, with the nearest field names. Then ``HfArgumentParser.parse_dict`` builds the
    dataclass, so its own ``__post_init__`` checks run.
    """
    from transformers import HfArgumentParser

    assert is_dataclass(dataclass_type)
    parser = HfArgumentParser(dataclass_type)  # raises itself for annotations it cannot resolve
    hints = get_type_hints(dataclass_type)
    field_names = {f.name for f in fields(dataclass_type)}
    values = {}
    for key, value in to_container(section).items():
        if key in field_names:
            where = f"{name}.{key}" if name else key
            values[key] = _coerced(value, hints[key], where)
            _reject_nan(values[key], where)
        elif value is not None:
            raise _unknown_field_error(key, dataclass_type, name)
    (parsed,) = parser.parse_dict(values, allow_extra_keys=False)
    return parsed


def _unknown_field_error(key: str, dataclass_type, name: str | None) -> ValueError:
    """``key`` is no field of ``dataclass_type``: the section, the key and the nearest field names."""
    names = sorted(f.name for f in fields(dataclass_type))
    listed = ", ".join(names) if len(names) <= 40 else f"the {len(names)} fields of {dataclass_type.__name__}"
    where = f"section {name!r}" if name else dataclass_type.__name__
    return ValueError(f"Unknown key {key!r} in {where}: {_did_you_mean(key, names)} Its fields are {listed}.")


def save_resolved_config(cfg, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path | None:
    """Write the resolved config (``name`` and the run record :data:`~unidetox.run_dir.CONFIG_FILE`, secrets masked)
    on the main process only.

    The rank comes from the usual launcher env variables (:func:`unidetox.processes.is_main_process`).
    """
    from omegaconf import OmegaConf

    if not is_main_process():
        return None
    masked = mask_secrets(cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    OmegaConf.save(OmegaConf.create(masked), path)
    (out / CONFIG_FILE).write_text(json.dumps(masked, indent=2))
    return path
