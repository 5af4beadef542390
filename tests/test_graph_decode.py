"""Decode of one sequence into a StaticCache, eagerly and as CUDA-graph replays
(compress_gptoss.static_cache_decode, which verify-runtime --model times on a GPU), on the trained
tiny GPT-OSS. References: a plain forward over the whole sequence, and transformers' generate()."""
import json

import pytest
import torch

import compress_gptoss as c
from conftest import run_cli

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load(path, dtype, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = AutoTokenizer.from_pretrained(path)("def fibonacci(n):", return_tensors="pt").input_ids.to(device)
    return model, ids


def test_fed_tokens_give_the_logits_of_a_whole_sequence_forward(tiny_bf16):
    """Teacher-forced: each step's logits are those a plain forward (no cache) gives at that position
    of prompt + fed tokens. float32, so only a wrong position, mask or cache slot could differ."""
    model, ids = load(tiny_bf16, torch.float32)
    feed = torch.randint(0, model.config.vocab_size, (c.GRAPH_WARMUP_STEPS + 8,),
                         generator=torch.Generator().manual_seed(0)).tolist()
    r = c.static_cache_decode(model, ids, 8, feed=feed)
    assert r["fed"] == feed and len(r["logits"]) == len(feed) and r["tokens_per_s"] > 0
    with torch.no_grad():
        ref = model(torch.cat([ids, torch.tensor([feed])], 1)).logits[0, ids.shape[1]:]
    got = torch.stack([x[0] for x in r["logits"]])
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert r["tokens"][1:] == ref.argmax(-1).tolist()


def test_free_running_tokens_are_generates(tiny_bf16):
    """Its own greedy choices: the tokens transformers' generate() picks (dynamic cache)."""
    model, ids = load(tiny_bf16, torch.float32)
    r = c.static_cache_decode(model, ids, 10)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=len(r["tokens"]), do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(gen) >= 6, gen   # generate stops at an end-of-text token; the fixture's text runs longer
    assert r["tokens"][:len(gen)] == gen
    assert r["fed"] == r["tokens"][:-1]


def test_past_the_sliding_window_is_one_clear_error(tiny_bf16):
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    model, _ = load(tiny_bf16, torch.float32)
    ids = torch.zeros(1, 20, dtype=torch.long)   # 20 + 3 warm-up + 16 > the tiny model's window of 32
    with pytest.raises(c.UserError, match=r"exceed the sliding window \(32\).*fewer --new-tokens"):
        c.static_cache_decode(model, ids, 16)
    c.static_cache_decode(model, ids[:, :8], 4)
    assert AttentionMaskInterface._global_mapping["eager"] is eager_mask   # put back for other models


@needs_gpu
def test_graph_replays_give_the_eager_logits_on_the_gpu(tiny_bf16):
    """bf16 on the GPU: the graph fed the eager run's tokens gives its logits at every step, and
    free-running it chooses the same tokens."""
    model, ids = load(tiny_bf16, torch.bfloat16, "cuda")
    eager = c.static_cache_decode(model, ids, 12)
    graph = c.static_cache_decode(model, ids, 12, graph=True, feed=eager["fed"])
    for g, e in zip(graph["logits"], eager["logits"]):
        assert c.relative_error(g, e) <= 1e-3
    assert c.static_cache_decode(model, ids, 12, graph=True)["tokens"] == eager["tokens"]


@needs_gpu
def test_verify_model_times_graph_decode_on_the_gpu(tiny_bf16, quantized):
    """verify-runtime --model on a GPU: the kernels model and the BF16 source also decode as graph
    replays, and choose generate()'s greedy tokens (trained tiny model: no near-ties at these steps)."""
    pytest.importorskip("llmcompressor")
    r, out = quantized("rtn-w4a8-all", tiny_bf16, "--algo", "rtn", "--experts", "w4a8", "--mw", "w4a8", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    v = run_cli("verify-runtime", "--model", out, "--new-tokens", "8", "--prefill-tokens", "0", "--json")
    assert v.returncode == 0, v.stderr[-3000:]
    rep = json.loads(v.stdout)
    for who in ("quantized", "bf16_source"):
        g = rep[who]["graph_decode"]
        assert g.get("tokens_per_s", 0) > 0, g
        assert g["same_tokens_as_generate"] >= g["compared"] - 1, g
    text = run_cli("verify-runtime", "--model", out, "--new-tokens", "4", "--prefill-tokens", "0", "--no-graph")
    assert "decode graph    off (--no-graph)" in text.stdout, text.stdout


@needs_gpu
def test_kernels_decode_gives_the_same_bits_every_run(tiny_bf16, quantized):
    """The W4A8 kernels model decoding one prompt again, fed the same tokens: eagerly and as graph
    replays, every step's logits identical to the bit (split-K shares summed in split order, each
    token's experts in slot order). With fp32 atomics for both, two eager runs of one prompt
    differed by 5.6e-3 at a median step and up to 0.42 at single ones (H200; bench/RESULTS.md, measured and dropped)."""
    pytest.importorskip("llmcompressor")
    from transformers import AutoTokenizer
    r, out = quantized("rtn-w4a8-all", tiny_bf16, "--algo", "rtn", "--experts", "w4a8", "--mw", "w4a8", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    model = c.load_quantized_model(out)
    assert c.attach_int4_kernels(model)["w4a8"] > 0
    model.to("cuda").eval()
    ids = AutoTokenizer.from_pretrained(tiny_bf16)("def fibonacci(n):", return_tensors="pt").input_ids.cuda()
    runs = {}
    for name, graph in (("eager", False), ("eager again", False), ("graph", True), ("graph again", True)):
        runs[name] = c.static_cache_decode(model, ids, 12, graph=graph, feed=runs["eager"]["fed"] if runs else None)
    for a, b in (("eager", "eager again"), ("graph", "graph again")):
        assert all(torch.equal(x, y) for x, y in zip(runs[a]["logits"], runs[b]["logits"])), (a, b)
    for g, e in zip(runs["graph"]["logits"], runs["eager"]["logits"]):
        assert c.relative_error(g, e) <= 1e-3
