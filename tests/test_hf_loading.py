"""``shardwise.hf.from_pretrained`` / ``save_pretrained`` against transformers on one device.

Each checkpoint is a tiny model (random weights, no hub) written by transformers' own
``save_pretrained`` into several shard files. Every rank loads it twice: with
transformers on one device (the reference) and with shardwise at TP N, and compares
logits, greedy ``generate()``, the layout of every parameter and the bytes it read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate

from shardwise.hf import from_pretrained, save_pretrained
from shardwise.hf import loading as loading_module
from shardwise.testing import expect_raises, mesh_of

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, PROMPT, NEW = 130, 10, 2, 5, 5  # 130 rows split 33/33/33/31 at TP 4
SHARD = "24KB"  # every checkpoint below is written as several files


def _build(kind: str) -> Any:
    T = transformers
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "gpt2":  # tied lm_head, fused c_attn (strided: q_r | k_r | v_r per rank)
        return T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
            )
        )
    common = {"vocab_size": VOCAB, "intermediate_size": 128, "num_hidden_layers": 2, **ids}
    if kind == "llama":  # GQA 4 / 2 KV heads, tied embeddings; KV replicated at TP 4
        cfg = T.LlamaConfig(
            **common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        return T.LlamaForCausalLM(cfg)
    if kind == "qwen2":  # 6 heads / 2 KV heads, untied head: uneven heads at TP 4
        cfg = T.Qwen2Config(
            **common, hidden_size=96, num_attention_heads=6, num_key_value_heads=2
        )
        return T.Qwen2ForCausalLM(cfg)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for kind in ("gpt2", "llama", "qwen2"):
        path = root / kind
        _build(kind).save_pretrained(path, max_shard_size=SHARD)
        assert (path / "model.safetensors.index.json").is_file()
        paths[kind] = str(path)
    return paths


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _close(what: str, actual: torch.Tensor, expected: torch.Tensor, length: int) -> None:
    """Equal up to rounding in a reduction of ``length`` terms, at the values' scale."""
    eps = torch.finfo(expected.dtype).eps
    atol = eps * length * float(expected.abs().max())
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=0.0, msg=lambda m: f"{what}: {m}"
    )


def _layout(model: Any) -> dict[str, Any]:
    """Which parameters are not sharded, and this rank's bytes against the model's."""
    replicated, plain = [], []
    local = full = kept = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        full += size
        if isinstance(p, DTensor):
            local += p.to_local().numel() * p.element_size()
            if p.placements == (Replicate(),):
                kept += size
                if p.ndim == 2:  # a matrix left whole (row-parallel biases always are)
                    replicated.append(name)
        else:
            plain.append(name)
            local += size
            kept += size
    return {"replicated": replicated, "plain": plain, "local": local, "full": full, "kept": kept}


# -- bodies ---------------------------------------------------------------------------------
def _load_body(world: int, path: str, kind: str, dtype: torch.dtype | None) -> dict[str, Any]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    read: list[int] = []
    original = loading_module._Checkpoint.piece

    def counting(self: Any, *args: Any) -> torch.Tensor:
        t = original(self, *args)
        read.append(t.numel() * t.element_size())
        return t

    loading_module._Checkpoint.piece = counting  # type: ignore[method-assign]
    block = loading_module.READ_BLOCK
    loading_module.READ_BLOCK = 1024  # read each shard in many pieces
    try:
        tp = from_pretrained(path, mesh_of(world), dtype=dtype)
    finally:
        loading_module._Checkpoint.piece = original  # type: ignore[method-assign]
        loading_module.READ_BLOCK = block
    assert len(read) > 2 * len(list(tp.parameters()))
    assert not tp.training
    dtypes = {p.dtype for p in tp.parameters()}
    assert dtypes == {dtype or torch.float32}, dtypes
    assert tp.get_output_embeddings().weight is tp.get_input_embeddings().weight or kind == "qwen2"
    for name, buf in tp.named_buffers():
        assert not buf.is_meta, name
        torch.testing.assert_close(buf, ref.get_buffer(name), rtol=0, atol=0)
    ids = _ids(0)
    with torch.no_grad():
        expected, actual = ref(ids).logits, tp(ids).logits
    assert type(actual) is torch.Tensor and actual.shape == (BATCH, SEQ, VOCAB)
    hidden = ref.config.hidden_size
    length = hidden if dtype is None else 4 * hidden  # bf16: rounding at each of 2 layers
    _close(f"{kind} TP {world} logits", actual, expected, length)
    with torch.no_grad():
        a = ref.generate(ids[:, :PROMPT], max_new_tokens=NEW, do_sample=False)
        b = tp.generate(ids[:, :PROMPT], max_new_tokens=NEW, do_sample=False)
    if dtype is None:
        assert torch.equal(a, b), f"generate: tp {b.tolist()} != ref {a.tolist()}"
    layout = _layout(tp)
    layout["read"] = sum(read)
    layout["tokens"] = b.tolist()
    return layout


def _train_save_body(world: int, path: str, out: str) -> None:
    """One SGD step at TP ``world`` and on one device; save; reload with transformers."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    tp = from_pretrained(path, mesh_of(world)).train()
    ids, probe = _ids(1), _ids(2)
    with torch.no_grad():
        before = ref(probe).logits
    for model in (ref, tp):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    save_pretrained(tp, out, max_shard_size=SHARD)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "config.json" in files, files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), files
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tp.eval()
    ref.eval()
    with torch.no_grad():
        trained, reloaded, expected = tp(probe).logits, back(probe).logits, ref(probe).logits
    for name, p in tp.named_parameters():  # the very same weights
        full = p.full_tensor() if isinstance(p, DTensor) else p
        assert torch.equal(full, back.get_parameter(name)), name
    _close("reloaded vs trained TP", reloaded, trained, ref.config.hidden_size)
    assert (trained - before).abs().max() > 100 * (trained - expected).abs().max()  # it trained
    _close("trained TP vs trained reference", trained, expected, 4 * ref.config.hidden_size)


def _errors_body(world: int, missing: str, misshapen: str) -> list[str]:
    return [
        expect_raises(
            RuntimeError,
            from_pretrained,
            missing,
            mesh_of(world),
            match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing from the checkpoint",
        ),
        expect_raises(
            RuntimeError,
            from_pretrained,
            misshapen,
            mesh_of(world),
            match=r"shape mismatch for 'model\.norm\.weight': the checkpoint has \(63,\)",
        ),
    ]


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_from_pretrained_matches_transformers(pools, checkpoints, kind, world):
    reports = pools(world).run(_load_body, world, checkpoints[kind], kind, None)
    first = reports[0]
    assert all(r["tokens"] == first["tokens"] for r in reports)
    # Every matrix is a DTensor; the replicated ones are exactly the allowed exceptions.
    allowed = {
        ("gpt2", 2): set(), ("gpt2", 4): set(),
        ("llama", 2): set(), ("llama", 4): {"k_proj", "v_proj"},  # 2 KV heads < 4 ranks
        ("qwen2", 2): set(), ("qwen2", 4): {"q_proj", "k_proj", "v_proj", "o_proj"},
    }[kind, world]
    for r in reports:
        assert all(name.endswith(("bias", "wpe.weight")) or "norm" in name or "ln_" in name
                   for name in r["plain"]), r["plain"]
        assert {name.split(".")[-2] for name in r["replicated"]} == allowed, r["replicated"]
    # Each rank holds about 1/N of the model: all of what stays whole (biases, norms,
    # position embeddings, the replicated heads above), 1/N of the rest (a row more where
    # the vocabulary does not split evenly). It read exactly what it holds.
    for r in reports:
        sharded = r["full"] - r["kept"]
        assert r["kept"] < 0.05 * r["full"] or allowed, r
        assert r["local"] <= sharded / world * 1.02 + r["kept"], r
        assert r["read"] == r["local"], r
    assert sum(r["local"] - r["kept"] for r in reports) == first["full"] - first["kept"]


def test_from_pretrained_bf16(pools, checkpoints):
    reports = pools(2).run(_load_body, 2, checkpoints["llama"], "llama", torch.bfloat16)
    for r in reports:  # bf16 shards: half the float32 bytes read from the files
        assert r["read"] == 2 * r["local"]


@pytest.mark.parametrize(("kind", "world"), [("gpt2", 2), ("qwen2", 4)])
def test_train_save_pretrained_reload(pools, checkpoints, tmp_path, kind, world):
    out = str(tmp_path / "trained")
    pools(world).run(_train_save_body, world, checkpoints[kind], out)
    index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] or kind == "qwen2"  # tied: once


def _without(src: str, dst: Path, key: str, replace: torch.Tensor | None) -> str:
    """A copy of checkpoint ``src`` with tensor ``key`` dropped (or replaced)."""
    dst.mkdir()
    index = json.loads((Path(src) / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        with safe_open(os.path.join(src, file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if key in tensors:
            tensors.pop(key)
            if replace is not None:
                tensors[key] = replace
        save_file(tensors, os.fspath(dst / file), metadata={"format": "pt"})
    if replace is None:
        index["weight_map"].pop(key)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text((Path(src) / "config.json").read_text())
    return str(dst)


def test_missing_or_misshapen_tensor_raises_on_every_rank(pools, checkpoints, tmp_path):
    src = checkpoints["llama"]
    missing = _without(src, tmp_path / "missing", "model.layers.1.mlp.up_proj.weight", None)
    misshapen = _without(src, tmp_path / "misshapen", "model.norm.weight", torch.ones(63))
    messages = pools(2).run(_errors_body, 2, missing, misshapen)
    assert messages[0] == messages[1]  # the same error on every rank


def test_save_pretrained_refuses_a_plain_module(tmp_path):
    with pytest.raises(TypeError, match="transformers model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()

