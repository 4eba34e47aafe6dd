"""Class names, so a user can ask for a class by name ("Pembroke Welsh corgi") or by id.

`imagenet_classes.txt` holds the 1,000 ImageNet-1k classes in their index order (WordNet
lemmas, as torchvision and timm list them), one per line; a line may hold synonyms separated
by ", " ("Pembroke, Pembroke Welsh corgi" is class 263).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Optional, Sequence, Union

from cfg_jax import errors


@functools.cache
def imagenet() -> tuple[str, ...]:
  text = resources.files("cfg_jax.data").joinpath("imagenet_classes.txt").read_text("utf-8")
  return tuple(line for line in text.splitlines() if line)


def resolve(labels: Sequence[Union[int, str]], class_names: Optional[Sequence[str]]) -> list[int]:
  """Class ids for labels given as ids or names (the full line or any one of its synonyms,
  case-insensitive). An unknown or ambiguous name is an InputError that says so."""
  out = []
  for label in labels:
    if isinstance(label, (int,)) or str(label).strip().lstrip("-").isdigit():
      out.append(int(label))
      continue
    out.append(_lookup(str(label).strip(), class_names))
  return out


def _lookup(name: str, class_names: Optional[Sequence[str]]) -> int:
  if not class_names:
    raise errors.InputError(f"label {name!r} is a name, but this model's classes have none; "
                            "give class ids.")
  wanted = name.casefold()
  hits = [i for i, line in enumerate(class_names)
          if wanted == line.casefold() or wanted in (s.casefold() for s in line.split(", "))]
  if not hits:
    close = [line for line in class_names if wanted in line.casefold()][:3]
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise errors.InputError(f"no class is named {name!r}{hint}; give a class id or a name "
                            "from the model's class list.")
  if len(hits) > 1:
    raise errors.InputError(f"the class name {name!r} fits classes {hits}; give the id.")
  return hits[0]
