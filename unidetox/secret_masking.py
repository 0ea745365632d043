"""Secrets never reach a file or a log: one place that knows which config values are secret and hides them.

A config key is secret when its last part names a credential (``api_key``, ``token``, ``password``...). Every
config that is saved, logged or put into a report goes through :func:`mask_secrets`, which also hides the value of a
secret ``key=value`` written inside a string (an override in a list of overrides); error text that echoes an
override goes through :func:`mask_text`, and text that may quote a known secret (an HTTP library's message with the
request URL in it) through :func:`redact`. A trainer with :class:`SavesArgsWithoutSecrets` writes its arguments
(``training_args.bin``) with every secret field emptied, while its own arguments keep them for pushing.

Example:
    >>> from unidetox.secret_masking import mask_secrets, redact
    >>> mask_secrets({"scorer": {"name": "perspective", "api_key": "abc123"}})
    {'scorer': {'name': 'perspective', 'api_key': '***'}}
    >>> redact("GET https://x/analyze?key=abc123 failed", ["abc123"])
    'GET https://x/analyze?key=*** failed'
    >>> mask_secrets({"overrides": ["scorer=perspective", "scorer.api_key=abc123"]})
    {'overrides': ['scorer=perspective', 'scorer.api_key=***']}
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import dataclasses
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

MASK = "***"
# ``pad_token``/``start_token`` are vocabulary settings, not credentials: only named kinds of token are secret.
SECRET_KEY_PATTERN = re.compile(
    r"^(key|token|secret|password|passwd|credentials?)$|(^|_)(api_?key|secret|password|passwd)$|"
    r"(^|_)(hub|hf|auth|access|api|bearer)_token$",
    re.IGNORECASE,
)

# ``key=value`` inside text: the value runs to a quote, comma, bracket, brace, ``&`` or space (``=`` included, so
# all of ``api_key=a=b`` is hidden); a quoted value to its closing quote.
KEY_VALUE_PATTERN = re.compile(r"""\b(?P<key>[A-Za-z_]\w*)=(?P<value>"[^"]*"|'[^']*'|[^\s,'"\]}&]+)""")


def is_secret_key(key: Any) -> bool:
    """True for config keys that hold credentials: ``api_key``, ``hub_token``, ``password``, ``key``..."""
    return isinstance(key, str) and bool(SECRET_KEY_PATTERN.search(key))


def mask_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists and OmegaConf containers) with every secret value replaced by ``***``.

    Empty values (``None``, ``""``) stay as they are, so a saved config still shows that no key was set.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra, a dependency
        pass
    if isinstance(obj, Mapping):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else mask_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_secrets(v) for v in obj)
    if isinstance(obj, str):
        return mask_text(obj)
    return obj


def mask_text(text: str) -> str:
    """``text`` with the value of every secret ``key=value`` in it replaced by ``***`` (overrides, URL queries).

    >>> mask_text("Cannot parse the override 'scorer.api_key=a=b'")
    "Cannot parse the override 'scorer.api_key=***'"
    """
    return KEY_VALUE_PATTERN.sub(
        lambda m: f"{m['key']}={MASK}" if is_secret_key(m["key"]) else m[0], text)


def secret_values(obj: Any) -> list[str]:
    """Every non-empty secret value in ``obj`` (to :func:`redact` them from text)."""
    found: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str) and v:
                found.append(v)
            else:
                found += secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += secret_values(v)
    return found


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _without_secret_fields(state: Any) -> Any:
    """An object's pickled state with every secret attribute emptied (None) and secrets in its dicts masked."""
    if not isinstance(state, dict):
        return state
    return {k: (None if is_secret_key(k) and v else mask_secrets(v) if isinstance(v, Mapping) else v)
            for k, v in state.items()}


def _reduce_without_secrets(obj: Any):
    func, args, state, *rest = obj.__reduce_ex__(2)
    return (func, args, _without_secret_fields(state), *rest)


@contextlib.contextmanager
def pickled_without_secrets(obj: Any) -> Iterator[None]:
    """While the block runs, every pickle of an object of ``type(obj)`` (``torch.save`` included) holds no secret
    attribute; the objects themselves keep theirs. Not for blocks where other threads pickle such objects."""
    kind = type(obj)
    before = copyreg.dispatch_table.get(kind)
    copyreg.dispatch_table[kind] = _reduce_without_secrets
    try:
        yield
    finally:
        if before is None:
            del copyreg.dispatch_table[kind]
        else:
            copyreg.dispatch_table[kind] = before


class SavesArgsWithoutSecrets:
    """A ``transformers.Trainer`` mixin: the ``training_args.bin`` it writes (every checkpoint, the final save, a
    hub push's copy) holds no secret (``hub_token`` is None there); ``self.args`` keeps them, so pushing works.

    Put it before the trainer class: ``class MyTrainer(SavesArgsWithoutSecrets, SFTTrainer)``.
    """

    def _save(self, *args, **kwargs):
        with pickled_without_secrets(self.args):
            return super()._save(*args, **kwargs)

    def _push_from_checkpoint(self, *args, **kwargs):
        with pickled_without_secrets(self.args):
            return super()._push_from_checkpoint(*args, **kwargs)


# A job's pickle names its secrets by these environment variables; the job's environment holds their values.
JOB_SECRET_PREFIX = "UNIDETOX_JOB_SECRET_"
JOB_SECRET_REFERENCE = re.compile(rf"^\$({JOB_SECRET_PREFIX}[0-9a-f]{{16}})$")


def _with_secrets_replaced(obj: Any, replace: Callable[[str, str], str], key: Any = None) -> Any:
    """``obj`` with every non-empty secret string (a value under a secret key) replaced by ``replace(key, value)``;
    the same object where nothing changes, a shallow copy along the path to each change (inputs are never modified).
    Walks dataclasses, mappings, lists, tuples and OmegaConf containers."""
    if isinstance(obj, str):
        return replace(key, obj) if is_secret_key(key) and obj else obj
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            plain = OmegaConf.to_container(obj, resolve=False)
            walked = _with_secrets_replaced(plain, replace)
            if walked is plain:
                return obj
            rebuilt = OmegaConf.create(walked)
            OmegaConf.set_struct(rebuilt, OmegaConf.is_struct(obj))
            return rebuilt
    except ImportError:  # pragma: no cover - omegaconf comes with hydra, a dependency
        pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changed = {f.name: new for f in dataclasses.fields(obj) if hasattr(obj, f.name)
                   for old in [getattr(obj, f.name)] for new in [_with_secrets_replaced(old, replace, f.name)]
                   if new is not old}
        if not changed:
            return obj
        result = copy.copy(obj)
        for name, value in changed.items():
            object.__setattr__(result, name, value)
        return result
    if isinstance(obj, Mapping):
        items = {k: _with_secrets_replaced(v, replace, k) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else dict(items)
    if isinstance(obj, (list, tuple)):
        values = [_with_secrets_replaced(v, replace) for v in obj]
        return obj if all(a is b for a, b in zip(values, obj, strict=True)) else type(obj)(values)
    return obj


def secrets_to_environment(obj: Any) -> tuple[Any, dict[str, str]]:
    """``obj`` for a job's pickle: each secret value becomes a reference ``$UNIDETOX_JOB_SECRET_<random>``, and the
    returned environment maps each reference to its value. A job started with that environment gets the secrets
    back through :func:`secrets_from_environment`; the pickle on disk names only the variables.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Push:
    ...     hub_model_id: str
    ...     hub_token: str
    >>> masked, env = secrets_to_environment(Push("me/model", "hf_secret"))
    >>> masked.hub_token.startswith("$UNIDETOX_JOB_SECRET_"), list(env.values())
    (True, ['hf_secret'])
    >>> secrets_from_environment(masked, env) == Push("me/model", "hf_secret")
    True
    """
    names: dict[str, str] = {}

    def reference(key: str, value: str) -> str:
        names.setdefault(value, JOB_SECRET_PREFIX + secrets.token_hex(8))
        return "$" + names[value]

    return _with_secrets_replaced(obj, reference), {name: value for value, name in names.items()}


def secrets_from_environment(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """``obj`` with each ``$UNIDETOX_JOB_SECRET_...`` reference (see :func:`secrets_to_environment`) replaced by its
    value from ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ

    def value(key: str, text: str) -> str:
        match = JOB_SECRET_REFERENCE.match(text)
        if match is None:
            return text
        if match[1] not in environ:
            raise KeyError(f"The secret `{key}` was passed to this job as the environment variable {match[1]}, which "
                           "is not set here: start the job with the submitting process's environment (submitit's "
                           "local and SLURM executors pass it on by default).")
        return environ[match[1]]

    return _with_secrets_replaced(obj, value)
