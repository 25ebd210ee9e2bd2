"""`dvc plots show` renders offline (issue 14).

DVC's default page loads vega / vega-lite / vega-embed from a CDN, so without a network the plots
are blank. `.dvc/config` sets `plots.html_template` to `.dvc/plots/offline.html`, which loads the
npm builds vendored in `.dvc/plots/vendor/` by a path relative to `<repo>/dvc_plots/index.html`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC_DIR = ROOT / ".dvc"
VENDOR = DVC_DIR / "plots" / "vendor"
SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.I)
REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # any scheme (http:, https:, file:) or //host
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def _html_template() -> str:
    from dvc.config import Config

    return Config(dvc_dir=str(DVC_DIR), validate=False).load_one("repo").get("plots", {}).get("html_template")


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"dvc {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res


def _local_scripts(html: str, page: Path) -> list[Path]:
    """The files the page's <script src> tags load; fails on any remote URL."""
    srcs = SCRIPT_SRC.findall(html)
    remote = [s for s in srcs if REMOTE.match(s)]
    assert not remote, f"remote scripts in {page}: {remote}"
    return [(page.parent / s).resolve() for s in srcs]


def test_template_is_configured_and_loads_only_vendored_files():
    value = _html_template()
    assert value, ".dvc/config has no plots.html_template"
    template = (DVC_DIR / value).resolve()  # DVC resolves a relative value against .dvc/
    assert template.is_file(), template
    text = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in text  # DVC refuses a template without it
    assert "{scripts}" not in text  # where DVC would insert its CDN <script> tags
    assert not re.search(r"(?:src|href)\s*=\s*[\"'](?:https?:)?//", text, re.I)

    # Relative to the page DVC writes from the repo root: <repo>/dvc_plots/index.html.
    scripts = _local_scripts(text, ROOT / "dvc_plots" / "index.html")
    names = sorted(p.name for p in scripts)
    assert names == ["vega-embed.min.js", "vega-lite.min.js", "vega.min.js"]
    for path in scripts:
        assert path.is_file(), f"template loads {path}, which does not exist"
        assert VENDOR in path.parents, f"{path} is outside {VENDOR}"
        assert (path.parent / "LICENSE").is_file(), f"no LICENSE next to {path}"

    # The vendored builds are the ones recorded in vendor/README.md, and small.
    table = dict(re.findall(r"^\| (\S+\.min\.js) \|.*\| ([0-9a-f]{64}) \|$",
                            (VENDOR / "README.md").read_text(encoding="utf-8"), re.M))
    assert set(table) == {p.relative_to(VENDOR).as_posix() for p in scripts}
    for rel, digest in table.items():
        assert hashlib.sha256((VENDOR / rel).read_bytes()).hexdigest() == digest, rel
    total = sum(p.stat().st_size for p in VENDOR.rglob("*") if p.is_file())
    assert total < 1.5e6, f"vendor folder is {total} bytes"


@pytest.fixture(scope="module")
def plot_project(tmp_path_factory) -> Path:
    """A throwaway DVC project with this repo's template + vendor folder and one CSV plot."""
    root = tmp_path_factory.mktemp("plots")
    _dvc("init", "--no-scm", "-q", cwd=root)
    shutil.copytree(DVC_DIR / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    _dvc("config", "plots.html_template", _html_template(), cwd=root)
    (root / "curve.csv").write_text("step,reward\n0,0.1\n1,0.3\n2,0.25\n3,0.5\n4,0.65\n5,0.7\n")
    _dvc("plots", "show", "curve.csv", "-x", "step", "-y", "reward", cwd=root)  # plain: no --html-template
    return root


def test_dvc_plots_show_writes_a_page_without_remote_scripts(plot_project):
    page = plot_project / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert "vegaEmbed(" in html and "curve.csv" in html  # the plot is on the page
    assert "cdn.jsdelivr" not in html
    scripts = _local_scripts(html, page)
    assert len(scripts) == 3
    for path in scripts:
        assert path.is_file(), f"page loads {path}, which does not exist"


def _chromium() -> str | None:
    return next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, with every network name unresolvable."""
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
                          f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (Debian package `chromium`)")
def test_page_renders_in_headless_chromium_with_no_network(plot_project, tmp_path):
    browser = _chromium()
    dom = _dump_dom(browser, plot_project / "dvc_plots" / "index.html", tmp_path / "profile")
    assert 'class="marks"' in dom, "vega drew no chart (no canvas/svg with class marks)"
    assert 'id="vega-scripts-missing"' not in dom

    # From another output folder the relative paths miss: the page says so instead of going blank.
    (plot_project / "elsewhere").mkdir(exist_ok=True)  # DVC creates only the last folder
    _dvc("plots", "show", "curve.csv", "-x", "step", "-y", "reward", "-o", "elsewhere/deeper", cwd=plot_project)
    dom = _dump_dom(browser, plot_project / "elsewhere" / "deeper" / "index.html", tmp_path / "profile")
    assert 'id="vega-scripts-missing"' in dom
    assert 'class="marks"' not in dom
