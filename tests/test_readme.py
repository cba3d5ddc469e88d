"""README's examples run as written: the recipe shown is the shipped one, and the five-minute tour's
commands and its offline diffusers snippet work on a fresh folder (no network: HF_HUB_OFFLINE=1)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from ckptbend.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_the_recipe_shown_is_the_shipped_sharper_details():
    shown = parse_recipe(blocks(README, "toml")[0], "README")
    assert shown.canonical() == load_recipe(ROOT / "recipes" / "sharper-details.toml").canonical()


def test_the_test_command_is_the_one_ci_runs():
    assert "python3 -m pytest" in blocks(README, "bash")[0]
    assert re.search(r"^python3 -m pytest$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_the_tour_runs_offline_as_written(tmp_path):
    tour = section("A five-minute tour")
    commands, [snippet] = blocks(tour, "bash"), blocks(tour, "python")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "demo").mkdir()
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ckptbend").symlink_to(ROOT / "bin" / "ckptbend")
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "CKPTBEND_HASH_CACHE": "0"}
    script = "set -eu\n" + "\n".join(commands)     # `diff | head` may end by SIGPIPE, as it should
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "ok, identical to the recorded bake" in r.stdout

    # The `ls` comment lists the companion folder exactly.
    listed = re.search(r"^ls (\S+)\s+# (.*)$", "\n".join(commands), flags=re.M)
    shown = {name.rstrip("/") for name in listed.group(2).split()}
    assert shown == {p.name for p in (tmp_path / listed.group(1)).iterdir()}

    check = snippet + "\nassert latents.shape[-2:] == (8, 8) and bool(latents.isfinite().all())\nprint('ran')\n"
    r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ran"), r.stderr[-3000:]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    seen, out = {}, set(re.findall(r'<a id="([^"]+)">', text))
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_documents_stand_on_their_own():
    """Every link and every .md file a document names is in the repository, and every #anchor exists."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: link to {target}"
            if anchor:
                assert anchor in anchors(path), f"{doc.name}: no anchor #{anchor} in {path.name}"
        for name in re.findall(r"[\w./-]*\w\.md\b", re.sub(r"\]\([^)]*\)", "", text)):
            assert (doc.parent / name).exists() or (ROOT / name).exists(), f"{doc.name} names {name}"
