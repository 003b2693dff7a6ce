"""The sweep's jobs: (model type, class) for every entry of the three auto mappings."""

from __future__ import annotations

from typing import Any


def all_jobs() -> list[dict[str, Any]]:
    from transformers.models.auto import modeling_auto as auto

    jobs = {}
    for mapping in (
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    ):
        for model_type, names in mapping.items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                jobs[(model_type, name)] = {"type": model_type, "class": name}
    return [jobs[key] for key in sorted(jobs)]
