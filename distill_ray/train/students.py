"""Where a student starts: its base model as named, or a layer-dropped copy of it.

Keeping every k-th decoder layer (DistilBERT's initialisation, Minitron's depth pruning) gives a
smaller model that still speaks its parent's language, so fine-tuning starts far from random.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs
from transformers import PreTrainedModel

from distill_ray.chat import ensure_chat_template
from distill_ray.config.schema import LayerDrop, Student
from distill_ray.models import load_causal_lm
from distill_ray.storage import Workdir, filesystem_for


def kept_layers(total: int, drop: LayerDrop) -> list[int]:
    """Indices of the decoder layers kept: 0, k, 2k, ... (or 0 .. n - 1), plus the last one (`keep_last: true`)
    or the last n (`keep_last: n`)."""
    keep = list(range(min(drop.keep_first, total))) if drop.keep_first else list(range(0, total, drop.keep_every))
    last = int(drop.keep_last)  # True: 1, False: 0
    return sorted(set(keep) | set(range(max(total - last, 0), total)))


def drop_layers(model: PreTrainedModel, drop: LayerDrop) -> list[int]:
    """Keep only `kept_layers` of a decoder-only model in place; returns the kept indices."""
    import torch

    layers = _decoder_layers(model)
    keep = kept_layers(len(layers), drop)
    new = torch.nn.ModuleList([layers[i] for i in keep])
    for idx, layer in enumerate(new):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = idx  # the KV cache is indexed by position in the stack
    _set_decoder_layers(model, new)
    model.config.num_hidden_layers = len(keep)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        model.config.layer_types = [layer_types[i] for i in keep]
    return keep


def _decoder_layers(model: PreTrainedModel) -> Any:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ValueError(f"layer_drop: cannot find the decoder layers of {type(model).__name__}")
    return layers


def _set_decoder_layers(model: PreTrainedModel, layers: Any) -> None:
    base = getattr(model, model.base_model_prefix, model)
    setattr(base, "layers" if hasattr(base, "layers") else "h", layers)


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare_student(student: Student, workdir: Workdir, echo=print) -> dict[str, Any]:
    """The student's starting point, saved once under `students/<name>/init/` (local or S3) so that
    every training worker, on any node, loads the same weights. Returns its URI and size."""
    parts = ("students", student.name, "init")
    meta = workdir.read_json(*parts, "distill_ray_init.json")
    wanted = {"base_model": student.base_model, "layer_drop": student.layer_drop.model_dump() if student.layer_drop
              else None, "chat_template": student.chat_template}
    if meta and meta.get("source") == wanted:
        return {"uri": workdir.uri_of(*parts), **meta}
    model, tokenizer = load_causal_lm(student.base_model)
    total = len(_decoder_layers(model))
    kept = drop_layers(model, student.layer_drop) if student.layer_drop else list(range(total))
    ensure_chat_template(tokenizer, student.chat_template)
    meta = {"source": wanted, "layers": f"{len(kept)} of {total}", "kept_layers": kept,
            "parameters": count_parameters(model)}
    with tempfile.TemporaryDirectory(prefix="distill-ray-init-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        workdir.remove(*parts)
        upload_folder(tmp, workdir, *parts)
    workdir.write_json(meta, *parts, "distill_ray_init.json")
    echo(f"train[{student.name}]: starts from {student.base_model}"
         + (f", layers {kept} of {total} kept" if student.layer_drop else "")
         + f" ({meta['parameters'] / 1e6:.1f}M parameters)")
    return {"uri": workdir.uri_of(*parts), **meta}


def upload_folder(local: str, workdir: Workdir, *parts: str) -> None:
    """Copy a local folder to `<workdir>/<parts>` (local disk or S3)."""
    fs, root = filesystem_for(workdir.uri_of(*parts))
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copytree(local, root, dirs_exist_ok=True)
    else:
        fs.create_dir(root, recursive=True)
        pafs.copy_files(local, root, destination_filesystem=fs)
