"""Hugging Face checkpoints: read and write Qwen2.5 safetensors directories.

Loading memory-maps every *.safetensors file and builds each parameter with
`jax.make_array_from_callback`: every device (on every host) copies only its own shard out of the
map, so a 32B checkpoint never exists whole in host memory. Saving streams one Hugging Face tensor
at a time (one layer of one weight) into a temporary directory that replaces the target only when
complete, so an interrupted save never damages the checkpoint it was replacing.

Layouts. Hugging Face stores torch Linear weights as [out, in]; we store [in, out] with heads split
out, layers stacked on a leading axis:

    q_proj.weight [H*D, E]  <->  layers/self_attn/q_proj/kernel [L, E, H, D]
    o_proj.weight [E, H*D]  <->  layers/self_attn/o_proj/kernel [L, H, D, E]
    gate_proj.weight [M, E] <->  layers/mlp/gate_proj/kernel [L, E, M]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from dapo_jax import sharding
from dapo_jax.models import qwen2
from dapo_jax.models.qwen2 import Qwen2Config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template; it wins over the config's
# Files that travel with a checkpoint so that transformers/vLLM can serve it (tokenizer, generation).
COMPANION_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", CHAT_TEMPLATE_FILE, "generation_config.json")

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as (or written to) a Qwen2 checkpoint."""


# -- safetensors ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _read_header(file: Path) -> dict[str, _TensorInfo]:
    """Parse a safetensors header: u64 little-endian length, JSON, then the raw data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8:
            raise CheckpointError(f"{file}: header length {n} exceeds the file size {size}; the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: safetensors header is not valid JSON ({e})") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {meta.get('dtype')!r}")
        dtype, shape = _ST_DTYPES[meta["dtype"]], tuple(meta["shape"])
        begin, end = (8 + n + o for o in meta["data_offsets"])
        if end > size or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {key} ({meta['dtype']} {list(shape)}) has data offsets "
                                  f"{meta['data_offsets']} that do not fit the file; it is truncated or corrupt")
        out[key] = _TensorInfo(file, dtype, shape, begin, end)
    return out


class _SafetensorsReader:
    """Memory-mapped, lazily-read tensors of every file of a checkpoint."""

    def __init__(self, tensors: dict[str, _TensorInfo]):
        self.tensors = tensors
        self._maps: dict[Path, np.memmap] = {}

    def array(self, key: str) -> np.ndarray:
        """A read-only view; bytes are read from disk only when a slice of it is copied."""
        info = self.tensors[key]
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = self._maps[info.file][info.begin:info.end]
        return raw.view(info.dtype).reshape(info.shape)


def _write_safetensors(file: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]], arrays) -> None:
    """Write a safetensors file, pulling one array at a time from the iterator `arrays`."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format allows space padding; 8-byte alignment helps mmap readers
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (key, shape, dtype), array in zip(entries, arrays, strict=True):
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise AssertionError(f"{key}: writing {array.dtype}{list(array.shape)}, planned {dtype}{list(shape)}")
            f.write(np.ascontiguousarray(array).tobytes())
        f.flush()
        os.fsync(f.fileno())


# -- name and layout mapping ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """One parameter: our tree path, its Hugging Face name and shape, and the layout change.

    ours = hf.reshape(split).transpose(perm), where `split` is hf's shape with merged head axes
    split out. `layered` parameters have a leading layer axis on our side and one HF tensor per layer.
    """

    path: tuple[str, ...]
    hf_name: str  # "{i}" stands for the layer index
    hf_shape: tuple[int, ...]  # of one HF tensor
    perm: tuple[int, ...] = ()  # empty: identity

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf_name

    def to_ours(self, hf: np.ndarray, ours_shape) -> np.ndarray:
        if not self.perm:
            return hf.reshape(ours_shape)
        split = tuple(ours_shape[j] for j in np.argsort(self.perm))
        return hf.reshape(split).transpose(self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        view = ours.transpose(np.argsort(self.perm)) if self.perm else ours
        return view.reshape(self.hf_shape)


def _mappings(config: Qwen2Config) -> list[_Mapping]:
    E, M, V, D = config.hidden_size, config.intermediate_size, config.vocab_size, config.kv_head_dim
    attn, mlp = ("layers", "self_attn"), ("layers", "mlp")
    layer = "model.layers.{i}."
    maps = [_Mapping(("embed_tokens",), "model.embed_tokens.weight", (V, E))]
    for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads),
                        ("v_proj", config.num_key_value_heads)):
        # HF [N*D, E] -> split [N, D, E] -> ours [E, N, D]; bias [N*D] -> [N, D]
        maps.append(_Mapping(attn + (name, "kernel"), layer + f"self_attn.{name}.weight", (heads * D, E), (2, 0, 1)))
        maps.append(_Mapping(attn + (name, "bias"), layer + f"self_attn.{name}.bias", (heads * D,)))
    maps += [
        # HF [E, H*D] -> split [E, H, D] -> ours [H, D, E]
        _Mapping(attn + ("o_proj", "kernel"), layer + "self_attn.o_proj.weight",
                 (E, config.num_attention_heads * D), (1, 2, 0)),
        _Mapping(mlp + ("gate_proj", "kernel"), layer + "mlp.gate_proj.weight", (M, E), (1, 0)),
        _Mapping(mlp + ("up_proj", "kernel"), layer + "mlp.up_proj.weight", (M, E), (1, 0)),
        _Mapping(mlp + ("down_proj", "kernel"), layer + "mlp.down_proj.weight", (E, M), (1, 0)),
        _Mapping(("layers", "input_layernorm", "scale"), layer + "input_layernorm.weight", (E,)),
        _Mapping(("layers", "post_attention_layernorm", "scale"), layer + "post_attention_layernorm.weight", (E,)),
        _Mapping(("norm", "scale"), "model.norm.weight", (E,)),
    ]
    if not config.tie_word_embeddings:
        maps.append(_Mapping(("lm_head",), "lm_head.weight", (V, E)))
    return maps


def _hf_names(config: Qwen2Config, mapping: _Mapping) -> list[str]:
    if mapping.layered:
        return [mapping.hf_name.format(i=i) for i in range(config.num_hidden_layers)]
    return [mapping.hf_name]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# -- loading --------------------------------------------------------------------------------------


def _tensor_index(path: Path) -> dict[str, _TensorInfo]:
    """Every tensor of the checkpoint directory, checked against the index if there is one."""
    index_file, single = path / INDEX_FILE, path / SINGLE_FILE
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e!r}); it needs a 'weight_map'") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                keys = [k for k, v in weight_map.items() if v == name]
                raise CheckpointError(f"{index_file} maps {keys[0]} (and {len(keys) - 1} more) to {name}, "
                                      f"which is missing from {path}")
        tensors: dict[str, _TensorInfo] = {}
        for name in files:
            tensors.update(_read_header(path / name))
        for key, name in weight_map.items():
            if key not in tensors or tensors[key].file.name != name:
                raise CheckpointError(f"{index_file} says {key} is in {name}, but that file does not hold it")
        return tensors
    if single.exists():
        return _read_header(single)
    present = sorted(p.name for p in path.iterdir())
    hint = " PyTorch *.bin checkpoints are not read: re-save with safe_serialization=True." if any(
        p.endswith(".bin") for p in present) else ""
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (it holds {present}).{hint}")


def _check_tensors(config: Qwen2Config, tensors: dict[str, _TensorInfo]) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for mapping in _mappings(config):
        for name in _hf_names(config, mapping):
            expected[name] = mapping.hf_shape
    missing = [k for k in expected if k not in tensors]
    if missing:
        files = sorted({str(t.file.name) for t in tensors.values()})
        raise CheckpointError(f"tensor {missing[0]} (and {len(missing) - 1} more) is missing from {files} "
                              f"in {next(iter(tensors.values())).file.parent}; config.json expects it")
    for key, info in tensors.items():
        if key in expected:
            if info.shape != expected[key]:
                raise CheckpointError(f"{info.file}: {key} has shape {list(info.shape)} but config.json implies "
                                      f"{list(expected[key])}")
            if info.dtype.kind != "f" and info.dtype != np.dtype(ml_dtypes.bfloat16):
                raise CheckpointError(f"{info.file}: {key} has non-float dtype {info.dtype}")
        elif key == "lm_head.weight" and config.tie_word_embeddings:
            log.warning("%s: lm_head.weight is ignored because config.json ties it to the embeddings", info.file)
        elif not key.endswith("rotary_emb.inv_freq"):  # a buffer some old exports include
            raise CheckpointError(f"{info.file}: unexpected tensor {key}; it is not part of a Qwen2 model with "
                                  f"this config.json (is the config from a different model?)")


def read_config(path: str | os.PathLike, **runtime) -> Qwen2Config:
    """The Qwen2Config of a checkpoint directory's config.json."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist; a Hugging Face checkpoint directory needs its config.json")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    try:
        return Qwen2Config.from_hf_dict(hf, **runtime)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32", mesh=None, compute_dtype: str | None = None,
                       remat_policy: str = "none", attention: str = "auto"):
    """(config, params) from a Hugging Face Qwen2/Qwen2.5 checkpoint directory.

    dtype: the parameters' dtype; compute_dtype (default: dtype) the activations'. With a mesh,
    each parameter is placed straight into its sharding from the logical-axis rules.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = read_config(path, param_dtype=dtype, dtype=compute_dtype or dtype, remat_policy=remat_policy,
                         attention=attention)
    tensors = _tensor_index(path)
    _check_tensors(config, tensors)
    reader = _SafetensorsReader(tensors)
    abstract = qwen2.abstract_params(config)
    shardings = (qwen2.param_shardings(config, mesh) if mesh is not None else
                 jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract))
    target = config.params_dtype

    params: dict = {}
    for mapping in _mappings(config):
        shape = _get(abstract, mapping.path).shape
        names = _hf_names(config, mapping)
        if mapping.layered:
            def shard(index, names=names, mapping=mapping, shape=shape):
                layers = range(len(names))[index[0]]
                return np.stack([np.array(mapping.to_ours(reader.array(names[i]), shape[1:])[index[1:]], dtype=target)
                                 for i in layers])
        else:
            def shard(index, name=names[0], mapping=mapping, shape=shape):
                return np.array(mapping.to_ours(reader.array(name), shape)[index], dtype=target)
        _set(params, mapping.path, jax.make_array_from_callback(shape, _get(shardings, mapping.path), shard))
    return config, params


# -- saving ---------------------------------------------------------------------------------------


def save_hf_checkpoint(path: str | os.PathLike, config: Qwen2Config, params, *, dtype: str | None = None,
                       max_shard_bytes: int = 4 << 30, overwrite: bool = False,
                       copy_files_from: str | os.PathLike | None = None, chat_template: str | None = None) -> Path:
    """Write params as a Hugging Face checkpoint (safetensors shards, index, config.json).

    dtype: tensor dtype on disk (default: config.checkpoint_dtype). The directory is built next to
    `path` and moved into place only when complete; an existing checkpoint is replaced only with
    overwrite=True. copy_files_from: a directory whose tokenizer and generation files are copied
    along, so that the result can be served as is. chat_template: a Jinja chat template to write instead of
    the copied one (e.g. `tokenizer.chat_template(default_system)`: the prompt format the params were trained
    on). Every host must call this; host 0 writes.
    """
    path = Path(path)
    disk_dtype = np.dtype(qwen2._DTYPES[dtype or config.checkpoint_dtype])
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it, or choose a new path")
    writer = jax.process_index() == 0

    plan: list[tuple[str, tuple[int, ...], _Mapping, int | None]] = []
    abstract = qwen2.abstract_params(config)
    for mapping in _mappings(config):
        leaf = _get(params, mapping.path)
        expected = _get(abstract, mapping.path).shape
        if tuple(leaf.shape) != tuple(expected):
            raise CheckpointError(f"params{list(mapping.path)} has shape {list(leaf.shape)} but the config implies "
                                  f"{list(expected)}; are these params from a different config?")
        for i, name in enumerate(_hf_names(config, mapping)):
            plan.append((name, mapping.hf_shape, mapping, i if mapping.layered else None))
    # Hugging Face's order: embeddings, then layer by layer, then the final norm and head.
    plan.sort(key=lambda p: (p[0] != "model.embed_tokens.weight", -1 if p[3] is None else p[3],
                             p[0] in ("model.norm.weight", "lm_head.weight")))
    files: list[list[int]] = [[]]
    size = 0
    for k, (_, shape, _, _) in enumerate(plan):
        nbytes = int(np.prod(shape)) * disk_dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(k)
        size += nbytes
    names = ([SINGLE_FILE] if len(files) == 1 else
             [f"model-{n + 1:05d}-of-{len(files):05d}.safetensors" for n in range(len(files))])

    def hf_tensor(k):
        _, _, mapping, layer = plan[k]
        leaf = _get(params, mapping.path)
        ours = sharding.to_host(leaf if layer is None else leaf[layer])
        return mapping.to_hf(ours).astype(disk_dtype)

    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if writer:
            tmp.mkdir(parents=True)
        for name, members in zip(names, files):
            arrays = (hf_tensor(k) for k in members)
            if writer:
                _write_safetensors(tmp / name, [(plan[k][0], plan[k][1], disk_dtype) for k in members], arrays)
            else:
                for _ in arrays:  # take part in the gathers
                    pass
        if writer:
            if len(files) > 1:
                total = sum(int(np.prod(p[1])) * disk_dtype.itemsize for p in plan)
                index = {"metadata": {"total_size": total},
                         "weight_map": {plan[k][0]: name for name, members in zip(names, files) for k in members}}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
            hf_config = {**config.to_hf_dict(), "dtype": str(disk_dtype), "torch_dtype": str(disk_dtype)}
            (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
            if copy_files_from is not None:
                for companion in COMPANION_FILES:
                    if (Path(copy_files_from) / companion).is_file():
                        shutil.copy2(Path(copy_files_from) / companion, tmp / companion)
            if chat_template is not None:
                _write_chat_template(tmp, chat_template)
            _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf_checkpoint {path}")
    return path


def _write_chat_template(directory: Path, template: str) -> None:
    """Set the chat template in tokenizer_config.json and, if there is one, in chat_template.jinja."""
    config_file = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "chat_template": template}, indent=2, ensure_ascii=False))
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        (directory / CHAT_TEMPLATE_FILE).write_text(template)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an old `target` is kept aside until the move has succeeded."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)
