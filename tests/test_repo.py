"""The repository stands alone: every document it cites is in it, and every "Method §N" it cites exists."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITTEN_BY_THE_CODE = {"results.md"}  # scripts/ablation.py writes it into its output folder
PAPERS = {"DINO", "CLIP", "MAE"}  # "DINO §5.3": a section of a published paper, cited by name


def tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        names = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT) for f in files
                 if not any(p in d for p in (".git", "runs", "__pycache__"))]
    names = [n for n in names if n.endswith((".py", ".md", ".txt", ".sh")) or n.startswith(".ci/")]
    if not names:
        pytest.skip("no source files found")
    return {n: open(os.path.join(ROOT, n), encoding="utf-8").read() for n in names}


def method_sections():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "\n## Method\n" in readme, "the README must keep its Method section"
    method = readme.split("\n## Method\n", 1)[1].split("\n## ", 1)[0]
    return {int(n) for n in re.findall(r"\*\*§(\d+) ", method)}


def test_cited_documents_are_in_the_repository():
    files = tracked_text_files()
    present = {os.path.basename(n) for n in files} | WRITTEN_BY_THE_CODE
    for name, text in files.items():
        for doc in re.findall(r"\b[\w-]+\.md\b", text):
            assert doc in present, f"{name} cites {doc}, which is not in the repository"
        for label in re.findall(r"\b([A-Z][A-Z]+) §\d", text):  # an all-caps name and a section: a document
            assert label in PAPERS, f"{name} cites '{label} §', which is not a section of anything in the repository"


def test_method_citations_point_to_existing_sections():
    sections = method_sections()
    assert sections == set(range(1, len(sections) + 1)) and len(sections) >= 8
    for name, text in tracked_text_files().items():
        for n in re.findall(r"Method §(\d+)", text):
            assert int(n) in sections, f"{name} cites Method §{n}; the README's Method section has §1-§{len(sections)}"
