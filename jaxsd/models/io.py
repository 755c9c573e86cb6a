"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors with HF tensor names.

Our parameter paths mirror HF module names, so the mapping is mechanical:
("layers", 3, "self_attn", "q_proj", "kernel") <-> "model.layers.3.self_attn.q_proj.weight"
(kernels are stored [in, out] here and [out, in] in HF files, hence a transpose).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxsd.models.config import ModelConfig, dtype_name
from jaxsd.models.lora import LoraConfig
from jaxsd.models.qwen3 import Transformer
from jaxsd.models.sharding import DEFAULT_RULES, MeshRules, Rules, variable_sharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes (RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def hf_name(path: tuple[Any, ...]) -> str:
    """HF tensor name of the parameter at nnx state `path` (kernels -> ".weight")."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if parts == ["embed_tokens"]:
        parts = ["embed_tokens", "weight"]
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name


def _flat_params(state: nnx.State) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value-or-Variable) pairs of a state, in a stable order."""
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def _value(v: Any) -> Any:
    return v[...] if isinstance(v, nnx.Variable) else v


def to_hf_state_dict(
    model_or_params_state: nnx.Module | nnx.State,
    config: ModelConfig,
    *,
    lora: LoraConfig | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """HF-named numpy tensors ([out, in] weights); LoRA adapters merged as W + (alpha/r) A B.

    For a bare state holding adapters, pass `lora` (the scale alpha/r is not in the state).
    """
    if isinstance(model_or_params_state, nnx.Module):
        lora = model_or_params_state.lora_config
        state = nnx.state(model_or_params_state, nnx.Param)
    else:
        state = model_or_params_state
    flat = dict(_flat_params(state))
    out: dict[str, np.ndarray] = {}
    for path, var in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        # Host-side numpy: no per-shape XLA compiles, and a sharded array is gathered once.
        x = np.asarray(jax.device_get(_value(var)))
        if path[-1] == "kernel":
            a_path, b_path = path[:-1] + ("lora_a",), path[:-1] + ("lora_b",)
            if a_path in flat:
                if lora is None:
                    raise ValueError(
                        f"state has LoRA adapters at {'.'.join(map(str, path[:-1]))}; "
                        "pass lora=LoraConfig(...) so they can be merged"
                    )
                a = np.asarray(jax.device_get(_value(flat[a_path])), np.float32)
                b = np.asarray(jax.device_get(_value(flat[b_path])), np.float32)
                x = (x.astype(np.float32) + lora.scale * (a @ b)).astype(x.dtype)
            x = x.T
        out[hf_name(path)] = x if dtype is None else x.astype(jnp.dtype(dtype))
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _expected(model: Transformer) -> list[tuple[str, nnx.Variable, bool]]:
    """(HF name, variable, is_kernel) for every base parameter of `model`."""
    rows = []
    for path, var in _flat_params(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam):
            continue
        rows.append((hf_name(path), var, path[-1] == "kernel"))
    return rows


class _TensorSource(Mapping):
    """Read-on-demand view of a folder's safetensors; knows which file holds each tensor."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
            for f in sorted(set(self.files.values())):
                if not f.exists():
                    raise FileNotFoundError(f"{index} lists shard {f.name}, which is missing")
        elif (folder / SINGLE_FILE).exists():
            with safe_open(folder / SINGLE_FILE, framework="numpy") as f:
                self.files = {name: folder / SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}; jaxsd reads safetensors "
                "checkpoints only (convert .bin files with transformers' save_pretrained)"
            )
        self._handles: dict[Path, Any] = {}

    def file_of(self, name: str) -> str:
        return str(self.files[name])

    def _handle(self, name: str) -> Any:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read the whole tensor to answer.
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header (nothing is read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def block(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]`, reading only that block from the file."""
        return self._handle(name).get_slice(name)[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _shape_of(state_dict: Mapping[str, Any], name: str) -> tuple[int, ...]:
    if isinstance(state_dict, _TensorSource):
        return state_dict.shape(name)
    return tuple(state_dict[name].shape)


def _checked_rows(
    model: Transformer, state_dict: Mapping[str, Any]
) -> list[tuple[str, nnx.Variable, bool]]:
    """`_expected(model)` after checking the tensors' names and shapes (headers only)."""
    where = (
        (lambda n: f" in {state_dict.file_of(n)}")
        if hasattr(state_dict, "file_of")
        else (lambda n: " in the state dict")
    )
    rows = _expected(model)
    wanted = {name for name, _, _ in rows}
    unexpected = sorted(
        n
        for n in state_dict
        if n not in wanted
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and model.config.tie_word_embeddings)
    )
    if unexpected:
        raise ValueError(
            f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            f"{where(unexpected[0])}: the checkpoint does not match config "
            f"(model_type={model.config.model_type!r}, num_layers={model.config.num_layers})"
        )
    for name, var, is_kernel in rows:
        if name not in state_dict:
            origin = getattr(state_dict, "folder", "the state dict")
            raise ValueError(f"tensor {name} is missing from {origin}; the config requires it")
        shape = _shape_of(state_dict, name)
        want = tuple(var.shape[::-1]) if is_kernel else tuple(var.shape)
        if shape != want:
            raise ValueError(
                f"tensor {name}{where(name)} has shape {shape} but the config expects {want}"
            )
    return rows


def load_hf_state_dict(model: Transformer, state_dict: Mapping[str, Any]) -> Transformer:
    """Fill `model`'s base parameters in place from HF-named tensors; checks names and shapes.

    Adapters (if any) are left as they are. Errors name the tensor (and its file, when the
    mapping knows it).
    """
    for name, var, is_kernel in _checked_rows(model, state_dict):
        arr = state_dict[name]
        # Transpose and cast on the host: eager jnp ops would compile once per tensor shape.
        x = np.asarray(arr.T if is_kernel else arr).astype(var.dtype, copy=False)
        var.set_value(jnp.asarray(x))
    return model


def _block_reader(
    state_dict: Mapping[str, Any], name: str, is_kernel: bool, dtype: Any
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """index (of our [in, out] layout) -> that block of tensor `name`, cast to `dtype`.

    A kernel's block is the transposed block of the HF [out, in] tensor; files are read block
    by block (`_TensorSource.block`), and a block several devices hold (replicated axes) is
    read once.
    """
    read = state_dict.block if isinstance(state_dict, _TensorSource) else None
    done: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in done:
            hf_index = tuple(reversed(index)) if is_kernel else tuple(index)
            arr = read(name, hf_index) if read else np.asarray(state_dict[name])[hf_index]
            done[key] = np.asarray(arr.T if is_kernel else arr).astype(dtype, copy=False)
        return done[key]

    return block


def load_hf_state_dict_sharded(
    model: Transformer, state_dict: Mapping[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> Transformer:
    """`load_hf_state_dict` straight into each parameter's shards on `mesh`.

    Every device receives only its block of each tensor (`jax.make_array_from_callback`, the
    block read from the file), placed by the parameter's logical axes under `rules`: no device
    and no host ever holds the whole model (a replicated parameter is whole on each device).
    """
    for name, var, is_kernel in _checked_rows(model, state_dict):
        sharding = variable_sharding(var, mesh, rules)
        reader = _block_reader(state_dict, name, is_kernel, var.dtype)
        var.set_value(jax.make_array_from_callback(tuple(var.shape), sharding, reader))
    return model


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """Local folder as is; otherwise try the Hugging Face hub and fail with a clear message."""
    p = Path(path_or_name)
    if p.is_dir():
        return p
    name = str(path_or_name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or p.exists()
    if looks_local:
        raise FileNotFoundError(
            f"model folder {name} does not exist (expected a folder holding "
            "config.json and *.safetensors)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
        )
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one actionable message
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face hub (unreachable or unknown repo: "
            f"{type(e).__name__}: {e}); pass the path of a local folder with config.json and "
            "*.safetensors instead"
        ) from e


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """ModelConfig from `folder`/config.json."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing; a model folder needs config.json")
    try:
        return ModelConfig.from_hf_dict(json.loads(cfg_path.read_text()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e


def from_pretrained(
    path_or_name: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    lora: LoraConfig | None = None,
    seed: int = 0,
    attention: str = "jaxsd",
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> tuple[Transformer, ModelConfig]:
    """Load an HF folder (or hub name) into a `Transformer` with `dtype` params.

    compute_dtype defaults to `dtype`; `seed` initialises LoRA A matrices (B starts at zero);
    `attention` and `remat` are `ModelConfig`'s runtime switches. With `mesh`, every tensor
    goes straight into its shards (`load_hf_state_dict_sharded`) and the model constrains its
    residual stream by `rules`; without, the model is loaded onto the default device.
    """
    folder = _resolve(path_or_name)
    config = read_config(folder)
    config = dataclasses.replace(
        config,
        param_dtype=dtype_name(dtype),
        compute_dtype=dtype_name(dtype if compute_dtype is None else compute_dtype),
        attention=attention,
        remat=remat,
    )
    source = _TensorSource(folder)
    mesh_rules = None if mesh is None else MeshRules(mesh, tuple(rules))
    # Shapes only: the weights come from the files, so never materialise a random init.
    model = nnx.eval_shape(
        lambda: Transformer(config, rngs=nnx.Rngs(seed), lora=lora, mesh_rules=mesh_rules)
    )
    if mesh is None:
        load_hf_state_dict(model, source)
    else:
        load_hf_state_dict_sharded(model, source, mesh, rules)
    if lora is not None:
        _init_lora(model, seed, mesh, rules)
    return model, config


def _adapter_init(leaf: str, shape: tuple[int, ...], dtype: Any) -> Callable:
    """key -> an adapter's initial value: A ~ U(+-1/sqrt(in)) (PEFT's default), B = 0."""
    if leaf == "lora_a":
        bound = 1.0 / math.sqrt(shape[0])
        return lambda key: jax.random.uniform(key, shape, dtype, -bound, bound)
    return lambda key: jnp.zeros(shape, dtype)


def _init_lora(model: Transformer, seed: int, mesh: Mesh | None, rules: Rules) -> None:
    """Concrete adapter values for a shape-only model, made in their shards when there is a
    mesh (threefry draws the same values either way)."""
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(_flat_params(nnx.state(model, nnx.LoRAParam))):
        init = _adapter_init(path[-1], tuple(var.shape), var.dtype)
        if mesh is not None:
            init = jax.jit(init, out_shardings=variable_sharding(var, mesh, rules))
        var.set_value(init(jax.random.fold_in(key, i)))


def plain_model(config: ModelConfig, params: nnx.State | None = None) -> Transformer:
    """A LoRA-free `Transformer` of `config` holding `params` (a plain model's `nnx.Param`
    state, e.g. the trainer's weights with any adapters merged): the rollout engine's copy
    without a second read of the checkpoint. Without `params`, shapes only (values set later
    with `nnx.update`)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    if params is not None:
        nnx.update(model, params)
    return model


def save_pretrained(
    model: Transformer,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write an HF folder (config.json + safetensors, LoRA merged) transformers and vLLM load.

    Tensors larger in total than `max_shard_bytes` go to numbered shards with an index file.
    `tokenizer_dir` copies the tokenizer files found there.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, config, dtype=dtype)
    saved_dtype = dtype_name(dtype if dtype is not None else config.param_dtype)
    hf_cfg = config.to_hf_dict()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = saved_dtype
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(arr)
        size += arr.nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors without format metadata
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_FILE, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata=meta)
            weight_map.update({n: fname for n in shard})
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    if tokenizer_dir is not None:
        for fname in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.exists():
                shutil.copy(src, out / fname)
    return out
