"""Hugging Face checkpoints <-> `models.qwen2.Qwen2`, and the HF tokenizer with its chat template.

    model = load_model("/path/Qwen2.5-0.5B-Instruct", dtype="bfloat16")   # config.json + *.safetensors
    model = load_model(path, mesh=rlsoft.mesh.make_mesh(cfg))  # every parameter born sharded by the rules
    save_model(model, "/tmp/out")       # config.json + model.safetensors that transformers loads
    tok = Tokenizer.from_dir("/path/Qwen2.5-0.5B-Instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])  # ChatML text
    ids = tok.encode(prompt)

Loading never initialises random weights: the module is built abstractly (`nnx.eval_shape`) and each
tensor is read once (single file or shards listed in model.safetensors.index.json), checked against the
expected shape, cast to `param_dtype` in numpy (bf16 via ml_dtypes) and placed. Missing, unexpected or
mis-shaped tensors raise a one-line ValueError naming the tensor. HF Linear weights are [out, in];
NNX kernels are [in, out], hence the transposes.

On a mesh (`mesh=`) no parameter is ever whole on one device: each is created as a jax.Array with
its rule's NamedSharding (rlsoft.mesh over models.qwen2_sharding's logical axes, the shardings the
testbed trains with) by `jax.make_array_from_callback`, which asks for each local device's block;
the block is read from the file as a slice (`safe_open(...).get_slice`), so host memory holds at most
one tensor's distinct blocks at a time, and on several hosts each reads only its own devices' blocks.
`save_model` takes such a model as it is: one tensor at a time gathered to the host (across
processes with `process_allgather`; process 0 writes), files split at `max_shard_size` as
transformers does (huggingface_hub's split, model-0000i-of-0000n.safetensors + index).

Only the plain Qwen2 architecture is accepted: silu, default RoPE, no sliding window; anything else in
config.json raises rather than loading a model that silently computes something different.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Optional

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from models import qwen2_sharding
from models.qwen2 import Qwen2, Qwen2Config
from rlsoft import mesh as mesh_lib

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old exports contain


# --------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, dtype: str = "float32", param_dtype: Optional[str] = None) -> Qwen2Config:
    """Qwen2Config from a parsed HF config.json (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    if hf.get("model_type", "qwen2") != "qwen2":
        raise ValueError(f"model_type={hf.get('model_type')} is invalid; only qwen2 is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']} is invalid; Qwen2 uses silu")
    if hf.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is invalid; sliding-window attention is not implemented")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type} is invalid; only default RoPE is implemented")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    cfg = Qwen2Config(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        rope_theta=float(theta), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        dtype=dtype, param_dtype=param_dtype or dtype)
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"head_dim={hf['head_dim']} is invalid; Qwen2 needs hidden_size / heads = {cfg.head_dim}")
    return cfg


def config_to_hf(cfg: Qwen2Config) -> dict:
    """A config.json that transformers 4.x and 5.x both read as Qwen2ForCausalLM."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_hidden_layers,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


# --------------------------------------------------------------------------------------------
# Tensor names.


def _name_map(cfg: Qwen2Config) -> dict:
    """HF tensor name -> (NNX state path, transpose?)."""
    names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
             "model.norm.weight": (("norm", "weight"), False)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[pre + norm + ".weight"] = (("layers", i, norm, "weight"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[pre + f"self_attn.{proj}.weight"] = (("layers", i, "self_attn", proj, "kernel"), True)
            if proj != "o_proj":
                names[pre + f"self_attn.{proj}.bias"] = (("layers", i, "self_attn", proj, "bias"), False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[pre + f"mlp.{proj}.weight"] = (("layers", i, "mlp", proj, "kernel"), True)
    return names


def _tensor_files(model_dir: str) -> dict:
    """HF tensor name -> safetensors file, from the shard index or every *.safetensors file."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors file")
    out = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            out.update({name: file for name in f.keys()})
    return out


def load_model(model_dir: str, dtype: str = "float32", param_dtype: Optional[str] = None,
               mesh: Optional[Mesh] = None) -> Qwen2:
    """Qwen2 from a local HF directory, parameters in `param_dtype` (default: `dtype`); with `mesh`,
    each parameter read straight into its sharding (module docstring)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        cfg = config_from_hf(raw, dtype=dtype, param_dtype=param_dtype)
    except KeyError as e:
        raise ValueError(f"{path} lacks {e}") from None
    return load_weights(model_dir, cfg, mesh)


def param_sharding(cfg: Qwen2Config, path: tuple, shape: tuple, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of the parameter at NNX state `path`: rlsoft.mesh's rules over its logical axes
    (what rlsoft.mesh.param_shardings gives the testbed's params)."""
    spec = mesh_lib.logical_spec(qwen2_sharding.logical_axes(path), shape, mesh,
                                 units=qwen2_sharding.axis_units(cfg))
    return NamedSharding(mesh, spec)


def _read_sharded(tensor, shape: tuple, sharding: NamedSharding, transpose: bool, np_dtype) -> jax.Array:
    """A jax.Array of `shape` (the NNX layout) placed by `sharding`, each addressable block read from the
    safetensors slice `tensor` on its own (HF layout: transposed kernels); a block that several devices
    hold (replicated mesh axes) is read once."""
    blocks: dict = {}

    def block(index):  # index: one slice per NNX dimension
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            part = tensor[index[::-1] if transpose else index].astype(np_dtype)
            blocks[key] = np.ascontiguousarray(part.T if transpose else part)
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, block)


def load_weights(model_dir: str, cfg: Qwen2Config, mesh: Optional[Mesh] = None) -> Qwen2:
    names, files = _name_map(cfg), _tensor_files(model_dir)
    ignored = {n for n in files if n.endswith(_IGNORED_SUFFIXES)
               or (cfg.tie_word_embeddings and n == "lm_head.weight")}  # tied: HF ignores it too
    for name in sorted(files):
        if name not in names and name not in ignored:
            raise ValueError(f"unexpected tensor {name} in {model_dir}")
    for name in names:
        if name not in files:
            raise ValueError(f"missing tensor {name} in {model_dir}")

    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    np_dtype = _NP_DTYPES[cfg.param_dtype]
    by_file: dict = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    loaded = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="np") as f:
            for name in file_names:
                path, transpose = names[name]
                var = variables[path]
                want = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
                got = tuple(f.get_slice(name).get_shape())
                if got != want:
                    raise ValueError(f"tensor {name} has shape {got}, expected {want}")
                if mesh is not None:
                    value = _read_sharded(f.get_slice(name), tuple(var.shape),
                                          param_sharding(cfg, path, var.shape, mesh), transpose, np_dtype)
                else:
                    arr = f.get_tensor(name).astype(np_dtype)  # cast on host: device holds one copy
                    value = jnp.asarray(arr.T if transpose else arr)
                loaded[path] = var.replace(value)
    missing = set(variables) - set(loaded)
    if missing:  # a bug in _name_map, not in the checkpoint
        raise RuntimeError(f"no checkpoint tensor maps to state paths {sorted(missing)}")
    return nnx.merge(graphdef, nnx.from_flat_state(list(loaded.items())))


def save_model(model: Qwen2, out_dir: str, dtype: Optional[str] = None, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the weights in HF layout (`dtype` default the param dtype): model.safetensors,
    or past `max_shard_size` bytes (huggingface_hub's default, transformers 4's) numbered files and
    model.safetensors.index.json. Params may be sharded: each tensor is gathered when its file is
    written, so the host holds one file's tensors. Every process must call it; process 0 writes."""
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype={dtype} is invalid; expected one of {list(_NP_DTYPES)}")
    np_dtype = _NP_DTYPES[dtype]
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    names = _name_map(cfg)
    sizes = {name: math.prod(variables[path].shape) * np.dtype(np_dtype).itemsize for name, (path, _) in names.items()}
    split = huggingface_hub.split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda n: n, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        for old in glob.glob(os.path.join(out_dir, "model*.safetensors*")):  # a previous export's files
            os.remove(old)
    for file, file_names in split.filename_to_tensors.items():
        tensors = {}
        for name in file_names:
            path, transpose = names[name]
            arr = _gather(variables[path].get_value()).astype(np_dtype)
            tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
        if writer:
            save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    if not writer:
        return
    if split.is_sharded:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = hf["dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def _gather(x) -> np.ndarray:
    """The whole of one (possibly sharded) array on this host; across processes, every process's
    shards (multihost_utils.process_allgather, a collective: every process calls it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------------------------
# Tokenizer and chat template.


def render_chatml(messages: list, add_generation_prompt: bool = True) -> str:
    """ChatML as Qwen writes it: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _token_text(tok: Any) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    """tokenizer.json through the `tokenizers` package, plus the checkpoint's chat template."""

    def __init__(self, tokenizer, chat_template: Optional[str] = None, special_tokens: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._compiled = None  # (template text, compiled jinja template)

    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
        config = {}
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                try:
                    config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{config_path} is not valid JSON: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_path = os.path.join(model_dir, "chat_template.jinja")  # transformers >= 4.50 saves it here
        if os.path.exists(jinja_path):
            with open(jinja_path) as f:
                template = f.read()
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            tokenizer = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception
            reason = str(e).splitlines()[0] if str(e) else repr(e)
            raise ValueError(f"{path} is not a valid tokenizer.json: {reason}") from None
        return cls(tokenizer, template, special)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.find_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def find_id(self, token: str) -> Optional[int]:
        """The id of `token`, or None when the vocabulary lacks it."""
        return self.tokenizer.token_to_id(token)

    @property
    def eos_id(self) -> Optional[int]:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.token_id(eos)

    @property
    def pad_id(self) -> Optional[int]:
        pad = self.special_tokens.get("pad_token")
        return None if pad is None else self.token_id(pad)

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        # Chat-templated text already holds its special tokens; Qwen adds no BOS either way.
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's jinja chat template as transformers does; ChatML without one (or
        without jinja2)."""
        if self.chat_template is None:
            return render_chatml(messages, add_generation_prompt)
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from jinja2.ext import loopcontrols
        except ImportError:
            return render_chatml(messages, add_generation_prompt)
        if self._compiled is None or self._compiled[0] != self.chat_template:  # compiling costs ~20x a render
            self._compiled = (self.chat_template, _jinja_env(ImmutableSandboxedEnvironment, loopcontrols)
                              .from_string(self.chat_template))
        return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **kwargs)


def _jinja_env(env_cls, loopcontrols):
    """The environment transformers renders chat templates in (trim/lstrip blocks, tojson, raise_exception)."""
    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = env_cls(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env
