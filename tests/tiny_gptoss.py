"""Build a tiny GPT-OSS checkpoint in the exact on-disk layout of openai/gpt-oss-*.

The Hub is out of reach on our machines and CI, so tests and `make demo` make their own model:
a GptOssForCausalLM with small dimensions, briefly trained on the Python standard library's
docstrings (so perplexity / KL numbers mean something), then written the way OpenAI ships it:

  model.layers.N.mlp.experts.{gate_up_proj,down_proj}_blocks  uint8 [E, out, in/32, 16]
  model.layers.N.mlp.experts.{gate_up_proj,down_proj}_scales  uint8 [E, out, in/32] (E8M0, bias 127)
  everything else bf16, >= 2 safetensors shards + model.safetensors.index.json,
  config.json with quantization_config {quant_method: mxfp4, modules_to_not_convert: [...]},
  generation_config.json, chat_template.jinja and a tokenizer trained locally.

The default hidden size (192 = 1.5 x 128) is deliberately not a multiple of 128, like
gpt-oss's 2880 = 22.5 x 128, so group-size bugs show up on the tiny model.

Usage:  python tests/tiny_gptoss.py OUT_DIR [--layers 2 --hidden 192 ...] [--random]
The trained model is cached (GPTOSS_TINY_CACHE or ~/.cache/gptoss-compressor) by its settings.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FIXTURE_VERSION = 2  # bump when the layout or the training recipe changes (invalidates caches)

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                          "model.embed_tokens", "lm_head"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant<|message|>{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>"]


@dataclass(frozen=True)
class TinySpec:
    layers: int = 2
    hidden: int = 192          # 1.5 x 128: like 2880, not a multiple of 128
    intermediate: int = 192
    experts: int = 4
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 1024
    window: int = 32           # sliding_window of every other layer (gpt-oss: 128)
    train_steps: int = 300     # 0 = random weights (scale benchmarks)
    seq_len: int = 64
    seed: int = 0
    shards: int = 2

    def key(self) -> str:
        blob = json.dumps({"v": FIXTURE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- local text corpus

def docstring_corpus() -> list[str]:
    """Docstrings of the standard library: real English + code prose, deterministic, offline."""
    import importlib
    import inspect
    modules = ["argparse", "collections", "csv", "datetime", "decimal", "email.message",
               "fractions", "functools", "gzip", "heapq", "http.client", "inspect", "ipaddress",
               "itertools", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re",
               "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap",
               "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile"]
    seen, texts = set(), []
    for name in modules:
        mod = importlib.import_module(name)
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            for o in [obj] + ([v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
                              if inspect.isclass(obj) else []):
                doc = inspect.getdoc(o)
                if doc and len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    texts.append(doc.strip())
    return texts


def split_corpus(texts: list[str]) -> tuple[list[str], list[str]]:
    """Every 10th text is held out (evaluation), the rest is training / calibration text."""
    heldout = [t for i, t in enumerate(texts) if i % 10 == 0]
    train = [t for i, t in enumerate(texts) if i % 10 != 0]
    return train, heldout


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   additional_special_tokens=SPECIAL_TOKENS[1:4])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


# ---------------------------------------------------------------- MXFP4 encoder (fixture only)

def encode_mxfp4(weight_in_out):
    """[E, in, out] float weight (transformers layout) -> (blocks [E,out,in/32,16], scales [E,out,in/32]).

    Per block of 32 inputs: scale 2^e with e the smallest exponent that brings the block's max
    magnitude within FP4's 6.0, then each value rounds to the nearest FP4 code.
    """
    import torch
    w = weight_in_out.transpose(1, 2).float().contiguous()          # [E, out, in]
    E, O, I = w.shape
    assert I % 32 == 0, f"input size {I} must be a multiple of 32 for MXFP4"
    w = w.reshape(E, O, I // 32, 32)
    amax = w.abs().amax(-1).clamp(min=2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = w / torch.pow(2.0, e).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES[:8])
    mag = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1)     # 0..7
    code = (mag | ((scaled < 0) & (mag > 0)).to(torch.long) << 3).to(torch.uint8)
    code = code.reshape(E, O, I // 32, 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)                   # low nibble first
    scales = (e + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


# ---------------------------------------------------------------- model

def gptoss_config(spec: TinySpec, tokenizer):
    from transformers import GptOssConfig
    return GptOssConfig(
        num_hidden_layers=spec.layers, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        vocab_size=spec.vocab, max_position_embeddings=4096, sliding_window=spec.window,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        router_aux_loss_coef=0.0, tie_word_embeddings=False,
    )


def train_model(model, tokenizer, texts: list[str], spec: TinySpec) -> float:
    """A few hundred AdamW steps on the docstrings; returns the last loss."""
    import torch
    ids = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids)
    n = (len(data) - 1) // spec.seq_len
    x = data[: n * spec.seq_len].view(n, spec.seq_len)
    g = torch.Generator().manual_seed(spec.seed)
    # one thread: multi-threaded CPU kernels add in a varying order, and two trainings differed in
    # every tensor; with one thread they are bitwise equal (58 s instead of 43 s on 2 cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=spec.train_steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(spec.train_steps):
        batch = x[torch.randint(0, n, (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == spec.train_steps - 1:
            print(f"[tiny_gptoss] step {step:4d}/{spec.train_steps} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    torch.set_num_threads(threads)
    return float(loss.item())


def to_openai_layout(state_dict) -> dict:
    """transformers' unquantized names -> OpenAI's MXFP4 checkpoint tensors."""
    import torch
    out = {}
    for name, t in state_dict.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            blocks, scales = encode_mxfp4(t)
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        else:
            out[name] = t.detach().to(torch.bfloat16).contiguous()
    return out


def write_sharded(tensors: dict, out_dir: Path, shards: int) -> None:
    """Split by layer into `shards` files + model.safetensors.index.json, like the Hub checkpoints."""
    from safetensors.torch import save_file
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i:05d}-of-{shards - 1:05d}.safetensors"  # OpenAI's own numbering
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build(out_dir: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Write the MXFP4 checkpoint for `spec` into out_dir (trains it if spec.train_steps > 0)."""
    import torch
    from transformers import GenerationConfig, GptOssForCausalLM
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = docstring_corpus()
    train, heldout = split_corpus(texts)
    tok = train_tokenizer(train, spec.vocab, out)
    torch.manual_seed(spec.seed)
    cfg = gptoss_config(spec, tok)
    model = GptOssForCausalLM(cfg).float()
    if spec.train_steps:
        train_model(model, tok, train, spec)
    write_sharded(to_openai_layout(model.state_dict()), out, spec.shards)
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = ["GptOssForCausalLM"]
    cfg_dict["experts_per_token"] = spec.top_k   # OpenAI's config carries both names
    cfg_dict["quantization_config"] = {"quant_method": "mxfp4",
                                       "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
    cfg_dict.pop("torch_dtype", None)
    cfg_dict["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
    GenerationConfig(eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")],
                     pad_token_id=tok.pad_token_id, do_sample=True, temperature=1.0
                     ).save_pretrained(out)
    (out / "README.md").write_text("Tiny GPT-OSS built by tests/tiny_gptoss.py for gptoss-compressor's tests.\n")
    return out


GPTOSS_120B_LAYER = dict(hidden=2880, intermediate=2880, experts=128, top_k=4, heads=64, kv_heads=8,
                         head_dim=64, vocab=201088)


def build_random(out_dir: str | os.PathLike, spec: TinySpec) -> Path:
    """Random MXFP4 codes at any size (e.g. real 120b layers), written one layer per shard.

    No model is instantiated (a 120b layer is 12 GB in fp32): each tensor is drawn straight in its
    on-disk form, so memory stays at one shard. Scales sit around 2^-5, like trained weights.
    The tokenizer is the small trained one: its ids are valid rows of any larger vocabulary.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(split_corpus(docstring_corpus())[0][:400], 512, out)
    cfg = gptoss_config(spec, tok)
    g = torch.Generator().manual_seed(spec.seed)
    H, I, E, D = spec.hidden, spec.intermediate, spec.experts, spec.head_dim

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def mxfp4(out_f, in_f):
        return {"blocks": torch.randint(0, 256, (E, out_f, in_f // 32, 16), generator=g, dtype=torch.uint8),
                "scales": torch.randint(121, 125, (E, out_f, in_f // 32), generator=g, dtype=torch.uint8)}

    shards = [{"model.embed_tokens.weight": randn(spec.vocab, H), "lm_head.weight": randn(spec.vocab, H),
               "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}]
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.sinks": randn(spec.heads, std=1.0)}
        for proj, o, i in (("q_proj", spec.heads * D, H), ("k_proj", spec.kv_heads * D, H),
                           ("v_proj", spec.kv_heads * D, H), ("o_proj", H, spec.heads * D)):
            t[p + f"self_attn.{proj}.weight"] = randn(o, i)
            t[p + f"self_attn.{proj}.bias"] = randn(o)
        t[p + "mlp.router.weight"], t[p + "mlp.router.bias"] = randn(E, H), randn(E)
        for proj, o, i in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            q = mxfp4(o, i)
            t[p + f"mlp.experts.{proj}_blocks"], t[p + f"mlp.experts.{proj}_scales"] = q["blocks"], q["scales"]
            t[p + f"mlp.experts.{proj}_bias"] = randn(E, o)
        shards.append(t)
    weight_map, total = {}, 0
    for k, part in enumerate(shards):
        fname = f"model-{k:05d}-of-{len(shards) - 1:05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        for name, x in part.items():
            weight_map[name] = fname
            total += x.numel() * x.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg_dict = cfg.to_dict()
    cfg_dict.update(architectures=["GptOssForCausalLM"], experts_per_token=spec.top_k, dtype="bfloat16",
                    quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT})
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("GPTOSS_TINY_CACHE", Path.home() / ".cache" / "gptoss-compressor"))


def cached(spec: TinySpec = TinySpec()) -> Path:
    """The checkpoint for `spec`, built once per machine and then reused (read it, don't write)."""
    final = cache_root() / f"tiny-gptoss-mxfp4-{spec.key()}"
    if (final / "config.json").exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, spec)
    try:
        tmp.rename(final)  # atomic publish: a half-built cache is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process published it first
    return final


def corpus_jsonl(path: str | os.PathLike, which: str = "train", limit: int | None = None) -> Path:
    """Write {"text": ...} lines (calibration: 'train', evaluation: 'heldout')."""
    train, heldout = split_corpus(docstring_corpus())
    texts = (train if which == "train" else heldout)[:limit]
    p = Path(path)
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    for f, v in asdict(TinySpec()).items():
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=v)
    ap.add_argument("--random", action="store_true", help="random weights, no training (same as --train-steps 0)")
    ap.add_argument("--no-cache", action="store_true", help="build into OUT_DIR directly, ignoring the cache")
    ap.add_argument("--gptoss-120b-dims", action="store_true",
                    help="random MXFP4 codes with gpt-oss-120b's layer dimensions (use --layers to pick how many)")
    a = ap.parse_args()
    spec = TinySpec(**{f: getattr(a, f) for f in asdict(TinySpec())})
    if a.gptoss_120b_dims:
        print(build_random(a.out_dir, TinySpec(**{**asdict(spec), **GPTOSS_120B_LAYER})))
        return
    if a.random:
        spec = TinySpec(**{**asdict(spec), "train_steps": 0})
    if a.no_cache:
        print(build(a.out_dir, spec))
        return
    src = cached(spec)
    shutil.rmtree(a.out_dir, ignore_errors=True)
    shutil.copytree(src, a.out_dir)
    print(a.out_dir)


if __name__ == "__main__":
    main()
