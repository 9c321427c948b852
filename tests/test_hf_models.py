"""Hugging Face models under ``shardwise.hf``: parity with the single-device model.

Every body builds a tiny model from a config (random weights, no hub), deep-copies it,
parallelizes the copy with :func:`shardwise.hf.parallelize_hf` and checks, on every rank:
logits and HF's own loss (``labels=``), every parameter gradient, three AdamW steps, and
for causal LMs greedy ``generate()`` with a KV cache.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import parallelize_module
from shardwise.hf import (
    AttentionHeads,
    ColwiseConv1D,
    ColwiseHeads,
    RowwiseConv1D,
    RowwiseHeads,
    auto_plan,
    parallelize_hf,
    translate_tp_plan,
)
from shardwise.style import ColwiseParallel, RowwiseParallel
from shardwise.testing import expect_raises, mesh_of
from shardwise.testing.comms import ALL_GATHER, comm_counts
from shardwise.testing.tolerance import assert_close_at_scale, largest_magnitude, tolerance

pytest.importorskip("transformers")  # shardwise.hf itself does not import it

VOCAB, SEQ, BATCH, PROMPT, NEW = 128, 12, 2, 6, 5
WORLDS = [1, 2, 4]
AR = "allreduce_"


def _build(kind: str, **overrides: Any) -> nn.Module:
    """A 2-layer, 64-wide model of ``kind`` with dropout off (seeded by the caller)."""
    import transformers as T

    T.logging.set_verbosity_error()
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "attention_dropout": 0.0,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attn_implementation": "sdpa",
    }
    if kind == "gpt2":  # tied lm_head, fused c_attn, eager attention
        cfg = T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=overrides.pop("n_embd", 64),
            n_layer=2,
            n_head=overrides.pop("heads", 4),
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
            **overrides,
        )
        return T.GPT2LMHeadModel(cfg)
    if kind == "llama_gqa":  # 4 heads / 2 KV heads, tied embeddings: KV replicated at TP 4
        cfg = T.LlamaConfig(
            **{
                **common,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
                **overrides,
            }
        )
        return T.LlamaForCausalLM(cfg)
    if kind == "qwen2":  # q/k/v biases, 8 heads / 4 KV heads: even at TP 4; untied lm_head
        cfg = T.Qwen2Config(
            **{**common, "num_attention_heads": 8, "num_key_value_heads": 4, **overrides}
        )
        return T.Qwen2ForCausalLM(cfg)
    if kind == "mistral":  # one KV head (MQA), replicated on every rank; sliding window in use
        cfg = T.MistralConfig(
            **{
                **common,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "sliding_window": 5,
                **overrides,
            }
        )
        return T.MistralForCausalLM(cfg)
    if kind == "bert":  # MLM head tied to the word embeddings
        cfg = T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
            **overrides,
        )
        return T.BertForMaskedLM(cfg)
    raise ValueError(kind)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # some padding: the mask reaches every rank's heads
    return ids, mask


def _close(what: str, actual: Any, expected: Any, *, tol: float, scale: float) -> None:
    assert_close_at_scale(actual, expected, tol=tol, scale=scale, what=what)


def _tol(model: torch.nn.Module, steps: int) -> float:
    """float32 rounding over the model's longest reduction (its widest weight), ``steps`` steps."""
    return tolerance(torch.float32, reduction=max(max(p.shape) for p in model.parameters()), steps=steps)


# -- bodies (module level: the rank pool imports them by name) ------------------------------
def _parity(
    world: int, kind: str, overrides: dict[str, Any] | None = None, vocab_parallel: bool = True
) -> dict[str, Any]:
    torch.manual_seed(0)
    ref = _build(kind, **(overrides or {}))
    tp = copy.deepcopy(ref)
    plan = "auto" if vocab_parallel else auto_plan(tp, tp_size=world, vocab_parallel=False)
    tp = parallelize_module(tp, mesh_of(world), plan)
    # eps above the float32 noise of near-zero gradients: Adam would otherwise turn a
    # 1e-9 difference in such a gradient into a full +-lr step of different sign.
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-3, eps=1e-6)
    tp_params = dict(tp.named_parameters())
    assert sorted(tp_params) == sorted(n for n, _ in ref.named_parameters())
    grads = 0
    for step in range(3):
        ids, mask = _batch(step)
        labels = ids.masked_fill(mask == 0, -100)
        out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
        out_tp = tp(input_ids=ids, attention_mask=mask, labels=labels)
        vocab = ref.get_output_embeddings().out_features
        assert type(out_tp.logits) is torch.Tensor and out_tp.logits.shape == (BATCH, SEQ, vocab)
        tol = _tol(ref, step + 1)
        _close(f"step {step} logits", out_tp.logits, out_ref.logits, tol=tol,
               scale=largest_magnitude([out_ref.logits]))
        _close(f"step {step} loss", out_tp.loss, out_ref.loss, tol=tol,
               scale=largest_magnitude([out_ref.loss]))
        out_ref.loss.backward()
        out_tp.loss.backward()
        grad_scale = largest_magnitude(p.grad for p in ref.parameters())
        for name, p in ref.named_parameters():
            _close(
                f"step {step} grad {name}",
                _full(tp_params[name].grad),
                p.grad,
                tol=tol,
                scale=grad_scale,
            )
            grads += 1
        opt_ref.step()
        opt_tp.step()
        opt_ref.zero_grad()
        opt_tp.zero_grad()
    param_scale = largest_magnitude(ref.parameters())
    for name, p in ref.named_parameters():
        _close(
            f"param {name} after 3 steps",
            _full(tp_params[name].detach()),
            p.detach(),
            tol=_tol(ref, 3),
            scale=param_scale,
        )
    tokens = None
    if kind != "bert":
        ids, mask = _batch(9)
        with torch.no_grad():
            a = ref.generate(
                ids[:, :PROMPT],
                attention_mask=mask[:, :PROMPT],
                max_new_tokens=NEW,
                do_sample=False,
                use_cache=True,
            )
            b = tp.generate(
                ids[:, :PROMPT],
                attention_mask=mask[:, :PROMPT],
                max_new_tokens=NEW,
                do_sample=False,
                use_cache=True,
            )
        assert torch.equal(a, b), f"generate: tp {b.tolist()} != ref {a.tolist()}"
        tokens = b.tolist()
    out, inp = tp.get_output_embeddings(), tp.get_input_embeddings()
    return {
        "grads": grads,
        "tokens": tokens,
        "tied": out.weight is inp.weight,
        "embedding": type(inp.weight).__name__,
        "sharded": sum(isinstance(p, DTensor) for p in tp.parameters()),
    }


def _errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = []
    with CommDebugMode() as comms:
        torch.manual_seed(0)
        six = _build("gpt2", heads=6, n_embd=48)  # 6 heads on 4 ranks
        msgs.append(
            expect_raises(
                ValueError,
                parallelize_hf,
                six,
                mesh,
                match=r"transformer\.h\.0\.attn: 6 attention heads",
            )
        )
        assert not any(isinstance(p, DTensor) for p in six.parameters())
        # 3 KV heads on 4 ranks: neither >= nor a divisor of 4.
        llama = _build("llama_gqa", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
        msgs.append(
            expect_raises(
                ValueError,
                parallelize_hf,
                llama,
                mesh,
                match=r"model\.layers\.0\.self_attn: num_key_value_heads=3",
            )
        )
        # The plain (tp_size-less) plan refuses replicated KV heads, by name.
        msgs.append(
            expect_raises(
                ValueError,
                parallelize_hf,
                _build("llama_gqa"),
                mesh,
                auto_plan(_build("llama_gqa")),
                match="do not split evenly",
            )
        )
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    return msgs


def _collective_counts(
    world: int, kind: str, vocab_parallel: bool
) -> tuple[dict[str, int], dict[str, int]]:
    torch.manual_seed(0)
    model = _build(kind)
    plan = auto_plan(model, tp_size=world, vocab_parallel=vocab_parallel)
    tp = parallelize_hf(model, mesh_of(world), plan)
    ids, _ = _batch(0)
    with CommDebugMode() as fwd:
        loss = tp(input_ids=ids, labels=ids).loss
    with CommDebugMode() as bwd:
        loss.backward()
    return comm_counts(fwd), comm_counts(bwd)


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "qwen2", "mistral", "bert"])
def test_hf_parity(pools, world, kind):
    reports = pools(world).run(_parity, world, kind)
    first = reports[0]
    assert first["grads"] > 0 and all(r == first for r in reports)
    assert first["tied"] == (kind in ("gpt2", "llama_gqa", "bert"))
    assert first["sharded"] > 0  # DTensor parameters at every size, 1 included
    # The default plan shards the vocabulary (BERT's, tied to its decoder bias too, not).
    assert first["embedding"] == ("Parameter" if kind == "bert" else "DTensor")
    if kind != "bert":
        assert len(first["tokens"][0]) == PROMPT + NEW


@pytest.mark.parametrize(
    ("kind", "world", "overrides"),
    [("gpt2", 2, {}), ("gpt2", 4, {}), ("llama_gqa", 4, {"vocab_size": 130}), ("qwen2", 2, {})],
    ids=["gpt2-2-tied", "gpt2-4-tied", "llama_gqa-4-tied", "qwen2-2-untied"],
)
def test_hf_vocab_parallel_off(pools, kind, world, overrides):
    # vocab_parallel=False: the input embeddings stay replicated, and a tied head with
    # them (an untied one is still column-parallel). Same logits, loss, gradients, steps
    # and generate() as the single-device model.
    reports = pools(world).run(_parity, world, kind, overrides, False)
    first = reports[0]
    assert first["grads"] > 0 and all(r == first for r in reports)
    assert first["embedding"] == "Parameter"
    assert first["tied"] == (kind != "qwen2")
    assert len(first["tokens"][0]) == PROMPT + NEW


def test_vocab_parallel_leaves_a_tie_it_cannot_keep_alone():
    # BERT's decoder bias is also held by its prediction head: the head, and the word
    # embeddings tied to it, stay replicated.
    plan = auto_plan(_build("bert"), tp_size=2, vocab_parallel=True)
    assert not any("embeddings" in key or "decoder" in key for key in plan), list(plan)


def test_qwen2_uneven_heads(pools):
    """6 query heads / 2 KV heads on 4 ranks: KV heads replicated, query heads split 2+1."""
    plan = auto_plan(
        _build("qwen2", num_attention_heads=6, num_key_value_heads=2, head_dim=16), tp_size=4
    )
    assert isinstance(plan["model.layers.*.self_attn.q_proj"], ColwiseHeads)
    assert isinstance(plan["model.layers.*.self_attn.o_proj"], RowwiseHeads)
    overrides = {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16}
    reports = pools(4).run(_parity, 4, "qwen2", overrides)
    assert all(r == reports[0] for r in reports) and reports[0]["grads"] > 0


def test_indivisible_heads_raise_before_communicating(pools):
    msgs = pools(4).run(_errors, 4)[0]
    assert "6 attention heads and 6 key/value heads" in msgs[0] and "size 4" in msgs[0]


@pytest.mark.parametrize(
    ("kind", "world", "backward"),
    [("gpt2", 2, 4), ("llama_gqa", 2, 4), ("llama_gqa", 4, 8)],
    ids=["gpt2-2", "llama_gqa-2", "llama_gqa-4-replicated-kv"],
)
def test_collective_counts(pools, kind, world, backward):
    # Per layer, forward: one all-reduce after attention, one after the MLP. Backward: one
    # for q/k/v (one shared input, or GPT-2's fused c_attn) and one for the MLP input. With
    # KV heads replicated (4 ranks, 2 KV heads) q (ColwiseParallel) and k/v (ColwiseHeads)
    # still share one input all-reduce; k's and v's weight gradients (partial on each
    # rank) are all-reduced: 4 per layer.
    fwd, bwd = pools(world).run(_collective_counts, world, kind, False)[0]
    assert fwd == {AR: 4} and bwd == {AR: backward}


def test_collective_counts_vocab_parallel(pools):
    # The default plan adds, in forward, the embedding's all-reduce and the all-gather of
    # the logits; in backward, the all-reduce of the head's input gradient (f).
    fwd, bwd = pools(2).run(_collective_counts, 2, "gpt2", True)[0]
    assert fwd == {AR: 5, ALL_GATHER: 1} and bwd == {AR: 5}


def test_auto_plan_is_a_printable_dict():
    torch.manual_seed(0)
    llama = auto_plan(_build("llama_gqa"))
    assert list(llama)[:2] == ["model.layers.*.self_attn", "model.layers.*.self_attn.q_proj"]
    assert isinstance(llama["model.layers.*.self_attn"], AttentionHeads)
    assert isinstance(llama["model.layers.*.mlp.down_proj"], RowwiseParallel)
    # The vocabulary is sharded: embeddings by rows, the tied head with them.
    assert isinstance(llama["model.embed_tokens"], RowwiseParallel)
    assert isinstance(llama["lm_head"], ColwiseParallel)
    assert "lm_head" not in auto_plan(_build("llama_gqa"), vocab_parallel=False)  # tied: whole
    assert "AttentionHeads(heads=4, kv_heads=2, head_dim=16)" in repr(llama)
    qwen = auto_plan(_build("qwen2"), tp_size=4)
    assert isinstance(qwen["lm_head"], ColwiseParallel)  # untied: colwise, logits gathered
    assert not any(isinstance(s, (ColwiseHeads, RowwiseHeads)) for s in qwen.values())
    gqa4 = auto_plan(_build("llama_gqa"), tp_size=4)
    assert isinstance(gqa4["model.layers.*.self_attn.k_proj"], ColwiseHeads)
    assert isinstance(gqa4["model.layers.*.self_attn.q_proj"], ColwiseParallel)
    gpt2 = auto_plan(_build("gpt2"))
    assert repr(gpt2["transformer.h.*.attn.c_attn"]) == "ColwiseConv1D(parts=3)"
    assert isinstance(gpt2["transformer.h.*.mlp.c_proj"], RowwiseConv1D)
    assert isinstance(gpt2["transformer.h.*.mlp.c_fc"], ColwiseConv1D)
    bert = auto_plan(_build("bert"))
    assert set(bert) == {
        f"bert.encoder.layer.*.{k}"
        for k in (
            "attention.self",
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    plan, skipped = translate_tp_plan(
        {"lm_head": "colwise_gather_output", "embed_tokens": "embedding_rowwise"}
    )
    assert list(plan) == ["lm_head"] and skipped == {"embed_tokens": "embedding_rowwise"}
    with pytest.raises(NotImplementedError, match="model_type"):
        import transformers as T

        auto_plan(
            T.OPTForCausalLM(
                T.OPTConfig(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=1,
                    ffn_dim=64,
                    num_attention_heads=2,
                )
            )
        )


def _gpt2_checkpoint(world: int | None, path: str, save: bool) -> float:
    """Train GPT-2 two steps and save (``save``), or load; then one more step's loss."""
    from shardwise.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0 if save else 1)  # a load must overwrite different weights
    model = _build("gpt2")
    if world is not None:
        model = parallelize_module(model, mesh_of(world), "auto")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    ids, mask = _batch(0)

    def step() -> float:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    if save:
        step(), step()
        save_checkpoint(path, model, opt)
    else:
        load_checkpoint(path, model, opt)
    return step()


def test_gpt2_checkpoint_reshards(pools, tmp_path):
    # GPT-2's fused c_attn is stored _StridedShard (a slice of q, k and v per rank), a
    # layout DCP's metadata cannot describe; it is saved replicated and loads at any size.
    path = str(tmp_path / "gpt2")
    saved = pools(2).run(_gpt2_checkpoint, 2, path, True)[0]
    losses = [
        *pools(4).run(_gpt2_checkpoint, 4, path, False),
        *pools(1).run(_gpt2_checkpoint, 1, path, False),
        _gpt2_checkpoint(None, path, False),
    ]
    for loss in losses:  # the same next step: weights and AdamW state came back
        assert loss == pytest.approx(saved, rel=1e-5, abs=1e-6)
