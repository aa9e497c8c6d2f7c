"""Test set-up: 8 CPU devices for the sharded paths, float32 matmuls, small random models."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs (read at its import) asks Cloud Storage's gRPC control API whether a bucket is zonal; the
# local GCS emulator the bucket tests run on serves only the JSON API, and the question times out
# after 60 s per bucket. Real buckets answer it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dapo_jax.models.qwen2 import Qwen2Config  # noqa: E402
from gcs_emulator import keep_preconditions  # noqa: E402



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs():
    """A Cloud Storage API server on 127.0.0.1 (`gcp-storage-emulator`, in memory) for the tests'
    session, and the environment that points every client at it, this process's and its
    subprocesses': gcsfs (which etils' epath and fsspec use: orbax's directories, the run lock) reads
    STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) TENSORSTORE_GCS_HTTP_URL with a test token.
    Yields a gcsfs filesystem on it; each test makes its own bucket."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    patch = pytest.MonkeyPatch()
    keep_preconditions(patch)
    server.start()
    # the emulator logs every missing object (orbax probes for many) as an error
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        yield gcsfs.GCSFileSystem(token="anon", project="dapo-jax-tests")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.suppress(Exception):
            server.stop()
        patch.undo()


def tiny_config(**overrides) -> Qwen2Config:
    """A Qwen2 small enough to run anywhere, with every architectural feature of the real ones."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, checkpoint_dtype="float32")
    return Qwen2Config(**{**base, **overrides})


def make_hf_model(tied: bool = False, seed: int = 0, **overrides):
    """A random-init transformers Qwen2ForCausalLM whose biases and norm scales are not trivial.

    Hugging Face's init sets biases to 0 and norm weights to 1, which would leave those paths of
    the port untested, so every parameter is redrawn.
    """
    import torch
    from transformers import Qwen2Config as HFQwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    c = tiny_config(tie_word_embeddings=tied, **overrides)
    hf = c.to_hf_dict()
    hf.pop("dtype"), hf.pop("torch_dtype"), hf.pop("rope_parameters")
    model = Qwen2ForCausalLM(HFQwen2Config(**hf)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def hf_checkpoint(request, tmp_path):
    """(directory, torch model) of a random small Qwen2 saved by transformers."""
    model = make_hf_model(tied=request.param)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def torch_logits(model, tokens, attention_mask=None):
    """Reference logits, with the position ids transformers' generate uses for left padding."""
    import torch

    tokens = torch.tensor(np.asarray(tokens))
    kwargs = {}
    if attention_mask is not None:
        mask = torch.tensor(np.asarray(attention_mask))
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(tokens, **kwargs).logits.float().numpy()


def left_padded_batch(seed: int, lengths, vocab: int, pad: int = 0):
    """Random token rows of the given lengths, left-padded to the longest: (tokens, mask)."""
    rng = np.random.RandomState(seed)
    width = max(lengths)
    tokens = np.full((len(lengths), width), pad, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = rng.randint(2, vocab, n)
        mask[row, width - n:] = 1
    return tokens, mask


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop each test module's compiled programs when it ends: the engine compiles one decode program
    per (slots, span) and the suite runs in one process, whose compiled code otherwise only grows."""
    yield
    import jax

    jax.clear_caches()


def loop_instructions(hlo: str, jit_name: str) -> list[str]:
    """The instructions of an optimized HLO module's `while` loops traced in `jax.jit(jit_name)`,
    and of every computation they call: what runs at every iteration."""
    computations = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
    pending = re.findall(rf'while\([^\n]*body=%?([\w.\-]+)[^\n]*op_name="jit\({jit_name}\)/while"', hlo)
    assert pending, f"no loop of jit({jit_name}) found in the HLO"
    seen, lines = set(), []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in computations[name].splitlines():
            pending += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", line)
            lines.append(line.strip())
    return lines


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "s8": 1, "u8": 1, "pred": 1}


def result_elements(instruction: str) -> list[tuple[str, int]]:
    """(dtype, elements) of each array an HLO instruction returns (several for a tuple)."""
    result = re.search(r" = (\(.*?\)|\S+) [\w\-]+\(", instruction).group(1)
    return [(dtype, math.prod(int(d) for d in dims.split(",") if d))
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result)]


def result_bytes(instruction: str) -> int:
    return sum(_BYTES[dtype] * n for dtype, n in result_elements(instruction))
