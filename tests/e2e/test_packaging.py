"""The project installs as one `loom` namespace: every subpackage lands in the built wheel, and
the README's main job (`python -m loom demo`) runs. Loom's top-level folders are never imported
as top-level modules, and a working directory never shadows installed packages in the processes
Loom starts (loom/_import_path.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"loom": "loom", "lang": "loom.lang", "runtime": "loom.runtime", "radix_cache": "loom.radix_cache", "kernels": "loom.kernels"}


def source_packages() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    return found


@pytest.mark.slow
def test_wheel_holds_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("loom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("__init__.py")}
    missing = source_packages() - in_wheel
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {sorted(missing)}"
    assert "loom/runtime/scheduler/scheduler.py" in names and "loom/radix_cache/radix_cache.py" in names


def test_every_package_imports():
    import importlib

    for package in sorted(source_packages()):
        importlib.import_module(package)


def test_cli_help_explains_commands():
    top = subprocess.run([sys.executable, "-m", "loom", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in top.stdout and "serve" in top.stdout
    out = subprocess.run([sys.executable, "-m", "loom", "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--model" in out.stdout and "LOOM_MODEL" in out.stdout


@pytest.mark.slow
def test_demo_runs_and_says_the_weights_are_random(tmp_path):
    env = {**os.environ, "LOOM_CACHE": str(tmp_path)}
    env.pop("LOOM_MODEL", None)
    out = subprocess.run(
        [sys.executable, "-m", "loom", "demo", "--random-weights", "--max-new-tokens", "4"], capture_output=True, text=True,
        env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "RANDOM WEIGHTS" in out.stdout
    assert "select" in out.stdout and "fields: {" in out.stdout and "chat (streamed)" in out.stdout
    assert "came from the radix cache" in out.stdout
    # The table's last three columns are prompt, cached and new tokens: every question after the
    # first reuses the cached few-shot prefix.
    rows = [line.split()[-3:] for line in out.stdout.splitlines() if line.startswith("What is")]
    assert len(rows) == 6, out.stdout
    cached = [int(c) for _, c, _ in rows]
    assert sum(c > 0 for c in cached) >= 5, out.stdout


# ----------------------------------------------------------------------------- working directories

DECOYS = ("kernels", "runtime", "lang")  # Loom's folder names; transformers imports Hugging Face's `kernels`


@pytest.fixture
def decoy_cwd(tmp_path: Path) -> tuple[Path, Path]:
    """A working directory holding packages named like Loom's folders, each of which notes its
    import in a marker file and then raises -> (the directory, the marker)."""
    cwd, marker = tmp_path / "cwd", tmp_path / "imported.txt"
    for name in DECOYS:
        (cwd / name).mkdir(parents=True)
        (cwd / name / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
            f"raise ImportError('the decoy {name!r} in the working directory was imported')\n"
        )
    return cwd, marker


def test_cli_ignores_packages_in_the_working_directory(decoy_cwd):
    cwd, marker = decoy_cwd
    for args in (["--help"], ["serve", "--help"]):  # serve's help reads ServerArgs (loom.runtime)
        out = subprocess.run([sys.executable, "-m", "loom", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "serve" in out.stdout
    assert not marker.exists(), marker.read_text()


def test_loom_never_imports_its_folders_as_top_level_modules():
    """From the repository root `python -c` puts the checkout first on sys.path; `import loom`
    takes it off again, so transformers gets Hugging Face's `kernels`, not Loom's."""
    code = textwrap.dedent("""
        import sys
        import loom
        import transformers.activations  # imports `kernels` (Hugging Face's) in transformers >= 5.25
        from loom.runtime.server_args import ServerArgs
        import loom.kernels
        for name in ("kernels", "runtime", "lang", "radix_cache"):
            module = sys.modules.get(name)
            assert module is None or not getattr(module, "__file__", "").startswith(sys.argv[1]), (name, module)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code, str(ROOT) + os.sep], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_source_root_is_found_only_in_a_checkout(tmp_path):
    from loom._import_path import source_root

    assert source_root() == ROOT  # an editable install of this checkout
    code = "import sys; sys.path[:0] = [sys.argv[1]]; from loom import _import_path as p; print(p.source_root())"
    fake = tmp_path / "site" / "loom"  # a wheel's layout: no pyproject.toml, no lang/ beside loom/
    fake.mkdir(parents=True)
    (fake / "_import_path.py").write_text((ROOT / "loom" / "_import_path.py").read_text())
    (fake / "__init__.py").write_text("")
    out = subprocess.run([sys.executable, "-c", code, str(fake.parent)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "None", out.stderr


@pytest.mark.slow
def test_engine_processes_ignore_packages_in_the_working_directory(decoy_cwd, llama_dir, tmp_path):
    """`loom.Engine` started from a folder holding decoys: the server, its scheduler ranks and its
    detokenizer all start, and none of them imports a decoy."""
    cwd, marker = decoy_cwd
    script = tmp_path / "elsewhere" / "run_engine.py"  # a user's script, outside the working directory
    script.parent.mkdir()
    script.write_text(textwrap.dedent(f"""
        import loom
        with loom.Engine(model_path={str(llama_dir)!r}, max_total_tokens=512, tp_size=2) as engine:
            out = engine.generate("Hello", {{"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
            print("tokens:", out["meta_info"]["completion_tokens"])
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tokens: 4" in out.stdout
    assert not marker.exists(), marker.read_text()
