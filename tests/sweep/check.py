"""One model type of the sweep: build it tiny, save it, and compare devicemap with
transformers' own `from_pretrained` of the same checkpoint.

Checks, in order (the first that fails is the result):
  build      transformers builds the tiny model and saves it
  roundtrip  transformers' from_pretrained gives the built model's logits back (else the
             type cannot be compared: transformers itself does not round-trip it)
  plan       devicemap plans it with half the weights on disk
  fp32       devicemap's load (half on disk, executing on the CPU) gives bit-equal logits
             and the same greedy tokens as from_pretrained
  bf16       a bf16 plan (half on disk) equals from_pretrained(dtype=bfloat16)
             ("bf16-reference": from_pretrained(dtype=bfloat16) itself cannot run it)
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from sweep.inputs import inputs

SEQ = 8  # prompt tokens
NEW = 4  # greedy tokens compared
SHARD = "300KB"  # several shards, as real checkpoints come


class Failed(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def check(model_type: str, class_name: str, root: str | Path) -> dict[str, Any]:
    """Run every check; {"status": "pass" | stage, "error": text, "seconds": float}."""
    start = time.perf_counter()
    directory = Path(tempfile.mkdtemp(prefix=f"{model_type}-", dir=root))
    try:
        _check(model_type, class_name, directory)
        result: dict[str, Any] = {"status": "pass", "error": ""}
    except Failed as failure:
        result = {"status": failure.stage, "error": str(failure)[:2000]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        gc.collect()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _stage(stage: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Failed:
        raise
    except Exception as error:
        tail = traceback.format_exception(error)[-3:]
        raise Failed(stage, f"{type(error).__name__}: {error}\n{''.join(tail)}") from error


def _check(model_type: str, class_name: str, directory: Path) -> None:
    import transformers

    from sweep.tiny_configs import tiny_config

    cls = getattr(transformers, class_name)
    config = _stage("build", tiny_config, model_type)
    built = _stage("build", _build, cls, config, directory)
    batch = inputs(built.config)
    expected = _stage("build", logits, built, batch)
    del built
    reference = _stage("roundtrip", lambda: cls.from_pretrained(directory).eval())
    if not _equal(_stage("roundtrip", logits, reference, batch), expected):
        raise Failed("roundtrip", "from_pretrained's logits differ from the built model's")
    _compare("fp32", directory, reference, batch, dtype=None)
    del reference
    gc.collect()
    reference = _stage("bf16", lambda: cls.from_pretrained(directory, dtype=torch.bfloat16))
    _compare("bf16", directory, reference.eval(), batch, dtype=torch.bfloat16)


def _build(cls: type, config: Any, directory: Path) -> Any:
    torch.manual_seed(0)
    model = cls(_config_for(cls, config)).eval()  # type: ignore[call-arg]
    _spread(model)
    model.save_pretrained(directory, max_shard_size=SHARD)
    return model


def _config_for(cls: type, config: Any) -> Any:
    """The config `cls` takes: a mapping may pair a composite model type (qwen3_5) with a
    class built from one of its sub-configs (Qwen3_5ForCausalLM: the text config), as
    AutoModelForCausalLM.from_config would pick it."""
    wanted = getattr(cls, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, wanted):
            return sub
    return config


@torch.no_grad()
def _spread(model: Any) -> None:
    """Embeddings with std 1 (random init makes every token look alike at std 0.02), so
    logits differ per position and greedy tokens vary."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model that does not expose them
        return
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.nn.Parameter) and weight.is_floating_point():
        weight.normal_(0.0, 1.0)


def _compare(
    stage: str, directory: Path, reference: Any, batch: dict[str, Any], dtype: Any
) -> None:
    import devicemap

    skeleton = _stage("plan", _skeleton, directory, dtype)
    plan = _stage("plan", half_on_disk, skeleton)
    model = _stage(stage, devicemap.load, skeleton, plan=plan, progress=False)
    if dtype is not None:  # images, audio features: in the dtype the model now has
        batch = {k: _cast(v, dtype) for k, v in batch.items()}
    try:
        # transformers itself first: a type it cannot run in bf16 has nothing to compare
        theirs = _stage(f"{stage}-reference", logits, reference, batch)
        ours = _stage(stage, logits, model, batch)
        if not _equal(ours, theirs):
            same_shape = ours.shape == theirs.shape
            diff = (ours.float() - theirs.float()).abs().max().item() if same_shape else "shape"
            raise Failed(stage, f"logits differ (max |diff| {diff})")
        if hasattr(reference, "generate") and _can_generate(reference):
            got = _stage(stage, greedy, model, batch)
            want = _stage(stage, greedy, reference, batch)
            if not torch.equal(got, want):
                raise Failed(stage, f"greedy tokens differ: {got.tolist()} vs {want.tolist()}")
    finally:
        devicemap.release(model)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def _skeleton(directory: Path, dtype: Any) -> Any:
    from devicemap.model.skeleton import build_skeleton

    return build_skeleton(directory, dtype=dtype)


def half_on_disk(skeleton: Any) -> Any:
    """A plan with about half the weights on disk, executing on the CPU (plain plan())."""
    import devicemap

    options: dict[str, Any] = {"context": 64, "offload_exec": "cpu"}
    roomy = devicemap.plan(skeleton, max_memory={"cpu": "4GiB", "disk": "4GiB"}, **options)
    weights = sum(b.nbytes for b in skeleton.blocks if not b.loose)  # loose: kept on cpu
    budget = roomy.usage("cpu").used - weights // 2
    plan = devicemap.plan(skeleton, max_memory={"cpu": budget, "disk": "4GiB"}, **options)
    if "disk" not in plan.device_map.values():
        raise Failed("plan", "nothing planned on disk")
    return plan


@torch.no_grad()
def logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    out = model(**batch, use_cache=False)
    result = out.logits if hasattr(out, "logits") else out[0]
    return result.detach()


@torch.no_grad()
def greedy(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    return out if isinstance(out, torch.Tensor) else out.sequences


def _can_generate(model: Any) -> bool:
    can = getattr(type(model), "can_generate", None)
    return bool(can()) if callable(can) else True


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN where the other has NaN (a random model may overflow the same way)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])
