"""The house's one-way rules, read from the import statements of every module.

- The library core (all of `cfg_jax` but `cfg_jax.app` and `cfg_jax.evaluation`) never
  imports the application shell (`cfg_jax.app`, and `cfg_jax.evaluation`, which uses it).
- Inference (the sampler, the guidance rules, the loaded-model object, the networks) never
  imports training.
- Every path under a workdir is spelt in one module, `cfg_jax.paths`.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cfg_jax"
SHELL = ("cfg_jax.app", "cfg_jax.evaluation")
INFERENCE = ("cfg_jax.schedules", "cfg_jax.diffusion", "cfg_jax.guidance", "cfg_jax.sampling",
             "cfg_jax.pipeline", "cfg_jax.sharded_sampling", "cfg_jax.models", "cfg_jax.images")
TRAINING = ("cfg_jax.train",)
WORKDIR_FILES = ("metrics.jsonl", "tensorboard", "train.log", "train.lock", "sweep.json")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, package: str = "cfg_jax"):
  """Every cfg_jax module `path` (of `package`) imports, at the top or inside a function."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base])
      for alias in node.names:  # `from cfg_jax import app` imports cfg_jax.app
        yield f"{base}.{alias.name}"


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _package(path: pathlib.Path) -> str:
  name = _module_name(path)
  return name if path.name == "__init__.py" else name.rpartition(".")[0]


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EDGES = [(m, imported) for m, p in MODULES.items() for imported in _imports(p, _package(p))
         if imported.startswith("cfg_jax")]


def test_the_walk_sees_the_package():
  assert {"cfg_jax.sampling", "cfg_jax.app.train_job", "cfg_jax.train.loop"} <= set(MODULES)
  assert ("cfg_jax.app.train_job", "cfg_jax.train.denoiser") in EDGES


@pytest.mark.parametrize("rule,sources,forbidden", [
    ("the core never imports the shell", None, SHELL),
    ("inference never imports training", INFERENCE, TRAINING),
])
def test_no_forbidden_import(rule, sources, forbidden):
  bad = [f"{m} imports {i}" for m, i in EDGES
         if (not _within(m, SHELL) if sources is None else _within(m, sources))
         and _within(i, forbidden)]
  assert not bad, f"{rule}: " + "; ".join(bad)


def _workdir_names(path: pathlib.Path):
  """The workdir file names that `path` spells as string constants (docstrings aside)."""
  tree = ast.parse(path.read_text())
  docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                and isinstance(node.body[0], ast.Expr)}
  return [node.value for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docstrings
          and (node.value in WORKDIR_FILES or node.value.startswith("samples_cfg"))]


def test_only_paths_spells_the_workdir_layout():
  spelt = [f"{name} spells {word!r}" for name, path in MODULES.items()
           if name != "cfg_jax.paths" for word in _workdir_names(path)]
  assert not spelt, "; ".join(spelt)
  assert _workdir_names(MODULES["cfg_jax.paths"])  # the check sees the names where they are


def test_the_checks_catch_a_violation(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text('"""Doc: metrics.jsonl"""\nfrom cfg_jax.app import console\n'
                 'def f(w):\n  from cfg_jax.train import loop\n  return w + "/train.log"\n'
                 'NAME = "metrics.jsonl"\n')
  assert set(_imports(bad)) == {"cfg_jax.app.console", "cfg_jax.train.loop"}
  assert _workdir_names(bad) == ["metrics.jsonl"]
