"""The core knows no modality by name: no string of a first-party modality (or ONE-PEACE's
"image") in its code, no import of a plugin. Allowed: the synthetic demo data and the demo, which
make and train on images, sounds and captions, and the one anchor of the default objective
(``peace_core.config.ANCHOR_MODALITY``). Names of json fields that happen to read "text" are not
modalities."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "peace_core"
FIRST_PARTY = {"vision", "audio", "text", "image"}
PLUGIN_PACKAGES = ("peace_vision", "peace_audio", "peace_text")
ALLOWED_FILES = {"demo.py", "synth.py", "synth_image.py", "synth_audio.py"}
#: Module-level names whose values may hold such strings.
ALLOWED_ASSIGNMENTS = {"ANCHOR_MODALITY", "CAPTION_FIELDS", "CAPTION_JSON_FIELDS"}


def _allowed_constants(tree: ast.Module) -> set[int]:
    allowed = set()
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in ALLOWED_ASSIGNMENTS for t in targets):
                allowed |= {id(n) for n in ast.walk(node)}
    return allowed


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed = _allowed_constants(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in FIRST_PARTY and id(node) not in allowed:
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules += [alias.name for alias in node.names]
            for module in modules:
                if module.startswith(PLUGIN_PACKAGES):
                    found.append(f"{path.name}:{node.lineno}: imports {module}")
    return found


def test_core_code_names_no_modality_and_imports_no_plugin() -> None:
    offences = [
        offence
        for path in sorted(CORE.rglob("*.py"))
        if path.name not in ALLOWED_FILES
        for offence in _offences(path)
    ]
    assert not offences, "the core names modalities or imports plugins:\n" + "\n".join(offences)


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('import peace_text.plugin\nNAME = "vision"\nCAPTION_FIELDS = ("text",)\n')
    found = _offences(planted)
    assert len(found) == 2 and "imports peace_text.plugin" in found[0] and "'vision'" in found[1]
