"""The release files: the wheel and sdist that `python -m build` makes, as PyPI and packagers see
them. The sdist must be a complete project: unpacked elsewhere, it builds the wheel, runs the test
suite against that wheel and builds the docs site, with no git history and no network."""

from __future__ import annotations

import email.message
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.settings import SESSION

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/django-isolatable/django-isolatable"
SUPPORTED_DJANGO = {"4.2", "5.1", "5.2", "6.0", "6.1"}
# What a packager needs besides the package itself, whether or not this is a git checkout.
PROJECT_FILES = [
    "LICENSE",
    "CHANGELOG.md",
    "README.md",
    "Makefile",
    "manage.py",
    "mkdocs.yml",
    "pyproject.toml",
    "docs/index.md",
    "example_project/settings.py",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/settings.py",
    "tests/services.py",
    "tests/conformance.py",
    "tests/testapp/__init__.py",
    "tests/testapp/management/commands/__init__.py",
]


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; its combined output, or a failure that shows it."""
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it, as `python -m build` makes them for a release.
    Without build isolation: the build needs no network, and dev extras bring setuptools."""
    pytest.importorskip("build", reason="the dev extras (build, twine) are not installed")
    outdir = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", outdir, ROOT)
    return outdir


def only(directory: Path, pattern: str) -> Path:
    (found,) = directory.glob(pattern)
    return found


def sdist_names(dist: Path) -> set[str]:
    """The sdist's files, relative to its top directory."""
    with tarfile.open(only(dist, "*.tar.gz")) as archive:
        return {
            name.split("/", 1)[1]
            for name in archive.getnames()
            if "/" in name and archive.getmember(name).isfile()
        }


def wheel_metadata(dist: Path) -> email.message.Message:
    with zipfile.ZipFile(only(dist, "*.whl")) as wheel:
        (name,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_the_wheel_holds_the_whole_package_and_the_licence(dist: Path) -> None:
    package = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "django_isolatable").rglob("*")
        if path.suffix in {".py", ".typed", ".html"} and "__pycache__" not in path.parts
    }
    with zipfile.ZipFile(only(dist, "*.whl")) as wheel:
        names = set(wheel.namelist())
        licences = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licences, f"no LICENSE in the wheel: {sorted(names)}"
        licence = licences[0]
        assert wheel.read(licence) == (ROOT / "LICENSE").read_bytes()
    assert package <= names, f"missing from the wheel: {sorted(package - names)}"
    outside = {n for n in names if n.split("/")[0] != "django_isolatable"}
    assert {n.split("/")[0] for n in outside} == {licence.split("/")[0]}, sorted(outside)
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_the_sdist_is_the_whole_project(dist: Path) -> None:
    names = sdist_names(dist)
    assert set(PROJECT_FILES) <= names, f"missing: {sorted(set(PROJECT_FILES) - names)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".sqlite3"))]
    if (ROOT / ".git").exists():  # a checkout: every tracked file but .gitignore ships
        tracked = set(run("git", "ls-files").split("\n")) - {"", ".gitignore"}
        assert tracked <= names, f"tracked but not in the sdist: {sorted(tracked - names)}"


def test_the_metadata_is_ready_to_publish(dist: Path) -> None:
    from packaging.version import Version

    trove_classifiers = pytest.importorskip("trove_classifiers")
    metadata = wheel_metadata(dist)
    version = Version(metadata["Version"])
    assert not version.is_prerelease, version  # a dev or pre-release: plain `pip install` skips it
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL", []))
    assert set(urls) == {"Documentation", "Source", "Changelog", "Issues"}
    assert all(url.startswith(REPOSITORY) for url in urls.values()), urls
    classifiers = metadata.get_all("Classifier", [])
    unknown = set(classifiers) - set(trove_classifiers.classifiers)
    assert not unknown, f"PyPI refuses unknown classifiers: {unknown}"
    assert "Development Status :: 4 - Beta" in classifiers
    django = {c.rsplit(" :: ", 1)[1] for c in classifiers if c.startswith("Framework :: Django ::")}
    assert django == SUPPORTED_DJANGO


def test_twine_accepts_both_files(dist: Path) -> None:
    pytest.importorskip("twine", reason="the dev extras (build, twine) are not installed")
    files = sorted(dist.iterdir())
    output = run(sys.executable, "-m", "twine", "check", "--strict", *files)
    assert output.count("PASSED") == 2, output


def test_the_readme_works_as_the_pypi_page() -> None:
    """PyPI shows README.md without the repository around it: every link must be absolute, and
    one into the repository must name a file (and a heading) that exists."""
    slugs = pytest.importorskip("pymdownx.slugs", reason="the docs extra is not installed")
    slugify = slugs.slugify(case="lower")  # GitHub's anchors, as mkdocs.yml sets for the site
    readme = (ROOT / "README.md").read_text()
    references = dict(re.findall(r"^\[([^\]]+)\]: (\S+)$", readme, re.MULTILINE))
    used = set(re.findall(r"\]\[([^\]]+)\]", readme))
    assert used <= set(references), f"undefined: {used - set(references)}"
    links = re.findall(r"\]\(([^)\s]+)\)", readme) + list(references.values())
    assert len(links) > 10
    assert [link for link in links if not link.startswith("https://")] == []
    for link in links:
        match = re.fullmatch(re.escape(REPOSITORY) + r"/(?:blob|tree)/main/([^#]+)(?:#(.+))?", link)
        if match is None:
            continue
        path, anchor = ROOT / match[1], match[2]
        assert path.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            assert anchor in {slugify(h.replace("`", ""), "-") for h in headings}, link
    assert f"git clone {REPOSITORY}.git" in readme
    assert "make demo" in readme
    assert "make test" in readme


def test_the_sdist_runs_its_own_tests_against_the_wheel(dist: Path, tmp_path: Path) -> None:
    """Unpacked elsewhere, the sdist's suite runs against the installed wheel (its own copy of
    the package removed), and its docs site builds."""
    with tarfile.open(only(dist, "*.tar.gz")) as archive:
        archive.extractall(tmp_path, filter="data")
    project = only(tmp_path, "django_isolatable-*")
    shutil.rmtree(project / "django_isolatable")
    target = tmp_path / "site-packages"
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
        "--target", target, only(dist, "*.whl"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISOLATABLE_", "PYTEST_"))}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["PYTHONPATH"] = str(target)
    # A session id of its own: the inner run's cleanup must not touch this session's keys.
    env["ISOLATABLE_TEST_SESSION"] = f"{SESSION}-sdist"

    code = "import django_isolatable as d; print(d.__file__); print(d.__version__)"
    where, version = run(sys.executable, "-c", code, cwd=project, env=env).split()
    assert Path(where).is_relative_to(target)
    assert version == wheel_metadata(dist)["Version"]

    output = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/test_conformance.py", "-k", "TestMemoryStrategy",
                 cwd=project, env=env)  # fmt: skip
    assert re.search(r"^\d+ passed", output, re.MULTILINE), output

    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    env["NO_MKDOCS_2_WARNING"] = "1"
    run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", tmp_path / "site",
        cwd=project, env=env)  # fmt: skip
    assert (tmp_path / "site" / "choosing" / "index.html").exists()
