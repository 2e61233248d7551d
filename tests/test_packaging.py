import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_core_imports_no_toolkit():
    code = (
        "import sys, zsq_plugins, zsq_plugins.zoo, zsq_plugins.datasets, zsq_plugins.cli;"
        "bad = [m for m in ('nncf', 'brevitas', 'torchao', 'onnxruntime', 'foolbox', 'torchvision')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_adapters_folder_is_installed_under_the_namespace():
    import zsq_plugins.adapters

    assert Path(zsq_plugins.adapters.__file__).parent == ROOT / "adapters"


def test_console_script_is_declared():
    scripts = metadata.distribution("zsq-plugins").entry_points.select(group="console_scripts")
    assert "zsq_plugins.cli:main" in {point.value for point in scripts}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_every_package_folder_is_declared_for_the_wheel():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = {
        ".".join(("zsq_plugins", *path.parent.relative_to(ROOT / "zsq_plugins").parts))
        for path in (ROOT / "zsq_plugins").rglob("__init__.py")
    }
    found.add("zsq_plugins.adapters")  # installed from the top-level adapters/ folder
    assert found == declared
