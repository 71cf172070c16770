"""The persistent compilation cache jaxscanvi turns on at import.

In-process tests call `configure_at_import` with the environment patched and
put JAX's settings back afterwards; the subprocess pair checks that a second
process of the same workflow loads its programs from the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from jaxscanvi import compile_cache, set_compilation_cache
from jaxscanvi.errors import InputError

SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No cache configured (as for a user who set nothing); JAX's settings restored."""
    saved = {k: getattr(jax.config, k) for k in SETTINGS}
    compile_cache._ours = None
    for k in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield tmp_path
    for k, v in saved.items():
        jax.config.update(k, v)
    compile_cache._ours = None
    cc.reset_cache()


def test_default_folder_under_xdg_cache_home(clean, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean / "xdg"))
    folder = compile_cache.configure_at_import()
    assert folder == clean / "xdg" / "jaxscanvi" / "jax" and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECS


def test_default_folder_under_home(clean):
    folder = compile_cache.configure_at_import()
    assert folder == clean / "home" / ".cache" / "jaxscanvi" / "jax"
    assert jax.config.jax_compilation_cache_dir == str(folder)


def test_env_names_a_folder(clean, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(clean / "mine"))
    assert compile_cache.configure_at_import() == clean / "mine"
    assert jax.config.jax_compilation_cache_dir == str(clean / "mine")


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_env_opt_out(clean, monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.configure_at_import() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (clean / "home").exists()


def test_users_jax_setting_is_kept(clean):
    jax.config.update("jax_compilation_cache_dir", str(clean / "users"))
    assert compile_cache.configure_at_import() is None
    assert jax.config.jax_compilation_cache_dir == str(clean / "users")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0  # untouched


def test_users_jax_env_var_is_kept(clean, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(clean / "users"))
    assert compile_cache.configure_at_import() is None
    assert jax.config.jax_compilation_cache_dir is None  # JAX reads it itself


def test_unwritable_folder_warns_and_goes_without(clean, monkeypatch):
    blocker = clean / "a_file"
    blocker.write_text("")  # a folder cannot be made under a file, even by root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(RuntimeWarning, match="compilation cache"):
        assert compile_cache.configure_at_import() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_set_compilation_cache(clean):
    assert set_compilation_cache(clean / "c") == clean / "c"
    assert jax.config.jax_compilation_cache_dir == str(clean / "c")
    assert set_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None
    (clean / "f").write_text("")
    with pytest.raises(InputError, match="cannot be created"):
        set_compilation_cache(clean / "f" / "c")


WORKFLOW = """
import json, sys, warnings
import jax
counts = {"hits": 0, "misses": 0}
def on_event(event, **kw):
    for k in counts:
        if event == "/jax/compilation_cache/cache_" + k:
            counts[k] += 1
jax.monitoring.register_event_listener(on_event)
warnings.simplefilter("ignore")
from jaxscanvi import SCVI, synthetic_atlas
a = synthetic_atlas(n_cells=120, n_genes=60, n_batches=2, n_lineages=1, markers_per_type=5,
                    seed=0)
SCVI.setup_anndata(a, batch_key="batch")
m = SCVI(a, n_hidden=8, n_latent=2, seed=0)
m.train(max_epochs=1, batch_size=64, progress_bar=False)
m.get_latent_representation()
print("RESULT " + json.dumps({**counts, "dir": jax.config.jax_compilation_cache_dir}))
"""


def _run_workflow(env) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", WORKFLOW], env=env, capture_output=True, text=True, timeout=600
    )
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stderr[-3000:]
    return json.loads(line[0][len("RESULT ") :])


@pytest.mark.system
def test_second_process_hits_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({compile_cache.ENV: "1", "XDG_CACHE_HOME": str(tmp_path)})
    first, second = _run_workflow(env), _run_workflow(env)
    assert first["dir"] == second["dir"] == str(tmp_path / "jaxscanvi" / "jax")
    assert first["hits"] == 0 and first["misses"] > 0
    # every program the first process compiled is loaded, none compiled again
    assert second["hits"] == first["misses"] and second["misses"] == 0


def test_suite_leaves_the_users_cache_alone():
    assert os.environ[compile_cache.ENV] == "0"  # tests/conftest.py
    assert jax.config.jax_compilation_cache_dir in (
        None,
        os.environ.get("JAX_COMPILATION_CACHE_DIR"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import jaxscanvi  # noqa: F401
