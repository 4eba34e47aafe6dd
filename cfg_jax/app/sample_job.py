"""`sample.py`'s job: load a workdir, sample in batches, write the `.npz` and a PNG grid; and
the guidance rule that sample.py's and sweep.py's flags describe."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import jax
import numpy as np

from cfg_jax import checkpoints, distributed, errors, paths, pipeline, sharded_sampling
from cfg_jax.app import command_flags, files
from cfg_jax.data import class_names
from cfg_jax.guidance import IndependentCondition
from cfg_jax.sampling.checks import check_labels


def guidance_rule(model: pipeline.Pipeline, workdir: str, guidance: str = "cfg",
                  guidance_scale=None, *, weak_workdir: Optional[str] = None,
                  weak_step: Optional[int] = None, uncond_workdir: Optional[str] = None,
                  method: Optional[str] = None, **options):
  """The guidance rule that sample.py/sweep.py's flags describe, for `model` (loaded from
  `workdir`; a model without a null label defaults to γ = 1, its conditional pass).

  Loads autoguidance's weak model from `weak_workdir` (default: `workdir`) at `weak_step`
  (default: its latest), and CFG's separate unconditional network from `uncond_workdir`.
  `options` are `command_flags.make_rule`'s. A guidance-distilled student takes plain cfg
  alone, as `guidance.Distilled`.
  """
  if model.guidance_distilled:  # γ is the student's input: no second model to load
    for flag, value in (("weak_workdir", weak_workdir), ("weak_step", weak_step),
                        ("uncond_workdir", uncond_workdir)):
      if value is not None:
        raise errors.InputError(f"--{flag} does not apply to {workdir}, a guidance-distilled "
                                "student, which takes γ as an input; sample its teacher for it.")
    return command_flags.make_rule(guidance, guidance_scale, method=method, distilled=True,
                                   **options)
  if uncond_workdir is not None and guidance != "cfg":
    raise errors.InputError(f"--uncond_workdir applies to --guidance=cfg only, not "
                            f"--guidance={guidance}.")
  if (guidance == "cfg" and guidance_scale is None and model.null_label is None
      and uncond_workdir is None):
    guidance_scale = 1.0  # no unconditional pass: the conditional model itself
  wants_weak = weak_workdir is not None or weak_step is not None
  if wants_weak and guidance != "autoguidance":
    raise errors.InputError(f"--weak_workdir and --weak_step apply to --guidance=autoguidance "
                            f"only, not --guidance={guidance}.")
  weak_eps_fn = None
  if guidance == "autoguidance" and wants_weak:
    weak_workdir = weak_workdir or workdir
    if os.path.abspath(weak_workdir) == os.path.abspath(workdir):
      latest = checkpoints.latest_step(paths.diffusion_checkpoints(weak_workdir))
      if weak_step is None or weak_step == latest:
        raise errors.InputError(f"The weak model would be the main model itself (step "
                                f"{latest}); pass an earlier --weak_step or another "
                                "--weak_workdir.")
    weak_eps_fn = pipeline.load_weak(model, weak_workdir, weak_step).eps_fn
  uncond_eps_fn = None
  if uncond_workdir is not None:
    uncond_eps_fn = pipeline.load_weak(model, uncond_workdir, role="unconditional").eps_fn
  return command_flags.make_rule(guidance, guidance_scale, method=method,
                                 weak_eps_fn=weak_eps_fn, uncond_eps_fn=uncond_eps_fn,
                                 **options)


def free_guidance(model: pipeline.Pipeline, scale: float) -> dict:
  """The sampling options of classifier-free guidance at γ = `scale`: CFG, or ICG for a model
  without a null label (whose γ = 1 is the conditional pass alone, as under CFG)."""
  if model.null_label is None and scale != 1:
    return {"guidance": IndependentCondition(scale, model.num_classes)}
  return {"guidance_scale": scale}


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """0, 1, …, K−1, 0, 1, … (num_samples of them)."""
  return np.arange(num_samples) % num_classes


def sample_to_npz(*, workdir: str, out: str, num_samples: int,
                  labels: Optional[Sequence[Union[int, str]]] = None, seed: int = 0, batch_size: int = 256,
                  classifier_workdir: Optional[str] = None, overwrite: bool = False,
                  rule: Optional[dict] = None, **sample_options) -> tuple[str, str]:
  """Loads the EMA model, samples `num_samples` images (labels cycled, default balanced),
  and writes the .npz and a PNG grid beside it; returns both paths.

  `rule` holds `guidance_rule`'s keywords (the --guidance flags); the rule it builds is
  passed to the sampler as `guidance`.
  """
  if num_samples < 1:
    raise errors.InputError(f"--num_samples must be positive, got {num_samples}.")
  sample_options = {k: v for k, v in sample_options.items() if v is not None}  # not given
  files.check_output_free(out, overwrite)
  files.check_output_free(files.grid_path_beside(out), overwrite)
  model = pipeline.load(workdir, classifier_workdir)
  model.check_options(**sample_options)
  if labels is None:
    label_array = balanced_labels(num_samples, model.num_classes)
  else:
    ids = class_names.resolve(labels, model.class_names)
    label_array = np.resize(np.asarray(ids, np.int64), num_samples)
  check_labels(label_array, null_label=None, num_classes=model.num_classes)  # ∅ is no class
  if sample_options.get("classifier_scale", 0) != 0 and model.classifier_fn is None:
    raise errors.InputError(f"--classifier_scale needs a noisy classifier, but {workdir} has "
                            "none; train one (config.classifier.num_steps > 0) or pass "
                            "--classifier_workdir.")
  if rule is not None:
    sample_options["guidance"] = guidance_rule(model, workdir,
                                               method=sample_options.get("method"), **rule)
  samples = sharded_sampling.sample_batches(jax.random.key(seed), model, label_array,
                                            batch_size=batch_size, progress=True,
                                            **sample_options)
  if not distributed.is_main():  # every process sampled; one writes
    return out, files.grid_path_beside(out)
  npz = files.write_npz(out, samples, label_array, overwrite)
  return npz, files.save_grid_beside(npz, samples, label_array)
