"""The house's rules that a reader relies on, checked: imports point down (the model side never reaches into the
trainer), recipes stand alone (none imports another), and the README stays a front door."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_outside_the_trainer_imports_it():
    upward = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                  if name == "engine.train" or name.startswith("engine.train."))
              for path in (ROOT / "engine").rglob("*.py") if "train" not in path.relative_to(ROOT / "engine").parts[:1]}
    assert not {path: names for path, names in upward.items() if names}


def test_recipes_import_nothing_from_each_other():
    """Shared settings live in the engine (engine/train/published.py, demos.py); a recipe is an entry point."""
    recipes = {path.stem for path in (ROOT / "recipes").glob("*.py")}
    crossing = {path.name: sorted(imported_modules(path) & recipes) for path in (ROOT / "recipes").glob("*.py")}
    assert not {name: names for name, names in crossing.items() if names}
    assert not any("sys.path.insert(0, str(Path(__file__).resolve().parent))" in path.read_text()
                   for path in (ROOT / "recipes").glob("*.py"))


def test_every_recipe_parses_its_command_line_through_the_one_entry_helper():
    for path in (ROOT / "recipes").glob("*.py"):
        text = path.read_text()
        assert "logging.basicConfig" not in text and "config_errors_exit" not in text, path.name
        assert "run_recipe(" in text or "parse_recipe(" in text, path.name


def test_the_readme_is_a_front_door_whose_links_resolve():
    """About 150 lines; the details live in docs/, and every relative link points at a file that exists."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
