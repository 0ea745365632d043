"""The library imports without Hydra: only composing a config (the command line, the recipes) needs hydra-core."""

import subprocess
import sys
import textwrap

import subprocesses

# Hydra made unimportable; then the public API and every stage's pipeline, whose `run(args)` takes dataclasses.
WITHOUT_HYDRA = textwrap.dedent("""
    import importlib, sys
    sys.modules["hydra"] = None
    import unidetox
    for name in unidetox.__all__:
        getattr(unidetox, name)
    for stage in ("distill", "detox", "evaluation", "replication"):
        importlib.import_module(f"unidetox.{stage}.pipeline")
    from unidetox.hydra_config import compose_config
    try:
        compose_config("detox")
    except ImportError as err:
        print("compose:", err)
""")


def test_the_library_and_every_stage_import_without_hydra():
    proc = subprocesses.run([sys.executable, "-c", WITHOUT_HYDRA], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "compose:" in proc.stdout and "hydra" in proc.stdout  # composing is what needs it
