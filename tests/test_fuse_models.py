"""fastmlp.fuse on Hugging Face transformers' own model code (optional: skips without
transformers; it is not a dependency). Tiny random configs of Llama, Qwen2, Mistral, Phi-3,
T5 v1.1 (gated GELU), OPT, BART, Whisper and CLIP: what fuse takes over in each, and that the fused
model computes what the stock one does (last hidden state, the gradient of every parameter).

transformers is imported through tests/optional_packages.py (the checkout's `kernels/`
folder would otherwise hide Hugging Face's `kernels` package from it).
"""

import copy

import pytest
import torch

import fastmlp
from optional_packages import import_transformers
from reference import assert_close

T = import_transformers()
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
ENCODER_DECODER = dict(d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=1,
                       decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                       vocab_size=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                       decoder_start_token_id=2, dropout=0.0)


def _build(name):
    if name == "llama":
        return T.LlamaModel(T.LlamaConfig(**SMALL))
    if name == "qwen2":
        return T.Qwen2Model(T.Qwen2Config(**SMALL))
    if name == "mistral":
        return T.MistralModel(T.MistralConfig(**SMALL))
    if name == "phi3":
        return T.Phi3Model(T.Phi3Config(**SMALL, pad_token_id=0))
    if name == "t5":
        return T.T5EncoderModel(T.T5Config(d_model=32, d_ff=48, d_kv=8, num_layers=1, num_heads=4,
                                           vocab_size=64, feed_forward_proj="gated-gelu",
                                           dropout_rate=0.0))
    if name == "opt":
        return T.OPTModel(T.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=64, pad_token_id=1,
                                      word_embed_proj_dim=32, max_position_embeddings=32,
                                      dropout=0.0))
    if name == "bart":
        return T.BartModel(T.BartConfig(**ENCODER_DECODER, max_position_embeddings=32))
    if name == "whisper":
        return T.WhisperModel(T.WhisperConfig(**ENCODER_DECODER, num_mel_bins=8,
                                              max_source_positions=8, max_target_positions=16))
    if name == "clip":
        return T.CLIPTextModel(T.CLIPTextConfig(hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=1, num_attention_heads=4,
                                                vocab_size=64, max_position_embeddings=16))
    raise AssertionError(name)


# What fuse must take over: each Linear's name suffix -> "gated" (one gated op), or an activation.
EXPECTED = {
    "llama": {"mlp.gate_proj": "silu", "mlp.up_proj": None},
    "qwen2": {"mlp.gate_proj": "silu", "mlp.up_proj": None},
    "mistral": {"mlp.gate_proj": "silu", "mlp.up_proj": None},
    "phi3": {"mlp.gate_up_proj": "silu"},
    "t5": {"DenseReluDense.wi_0": "gelu_tanh", "DenseReluDense.wi_1": None},
    "opt": {"fc1": "relu"},
    "bart": {"encoder.layers.0.fc1": "gelu", "decoder.layers.0.fc1": "gelu"},
    "whisper": {"encoder.layers.0.fc1": "gelu", "decoder.layers.0.fc1": "gelu"},
    "clip": {},      # quick_gelu: no fastmlp activation computes x * sigmoid(1.702 x)
}


def _inputs(name, model):
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    if name in ("bart",):
        return dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    if name == "whisper":
        features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
        return dict(input_features=features, decoder_input_ids=ids[:, :5])
    return dict(input_ids=ids)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fuse_takes_over_the_mlp_blocks(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    stock = copy.deepcopy(model)
    keys = list(model.state_dict())
    fused, report = fastmlp.fuse(model, return_report=True)
    assert list(fused.state_dict()) == keys
    got = {e.name: e for e in report if e.fused}
    for suffix, act in EXPECTED[name].items():
        matches = [e for n, e in got.items() if n.endswith(suffix)]
        assert matches, f"{suffix} was not fused:\n{report}"
        for e in matches:
            assert e.activation == act, str(e)
    assert len(got) == sum(len([n for n in got if n.endswith(s)]) for s in EXPECTED[name]), \
        f"fused more than expected:\n{report}"
    if name == "clip":
        assert "QuickGELUActivation" in str(report)

    inputs = _inputs(name, model)
    out_ref = stock(**inputs).last_hidden_state
    out = fused(**inputs).last_hidden_state
    assert_close(out, out_ref, torch.float32, f"{name} output")
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out.backward(grad)
    ref_params = dict(stock.named_parameters())
    for pname, p in fused.named_parameters():
        expected = ref_params[pname].grad
        if expected is None:
            assert p.grad is None, pname
        else:
            assert_close(p.grad, expected, torch.float32, f"{name} {pname} grad")


def _timm_layers():
    timm = pytest.importorskip("timm")   # skips where timm (or its torchvision) is missing
    return timm.layers


@pytest.mark.parametrize("block,fused_names", [
    ("Mlp", ["fc1"]), ("GluMlp", ["fc1"]), ("SwiGLUPacked", ["fc1"]),
    ("SwiGLU", ["fc1_g", "fc1_x"]),
])
def test_fuse_timm_mlp_blocks(block, fused_names):
    layers = _timm_layers()
    torch.manual_seed(3)
    model = getattr(layers, block)(12, 20).eval()
    stock = copy.deepcopy(model)
    fused, report = fastmlp.fuse(model, return_report=True)
    assert [e.name for e in report if e.fused] == fused_names, str(report)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = fused(x), stock(x_ref)
    assert_close(out, out_ref, torch.float32, f"{block} output")
    out.sum().backward()
    out_ref.sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float32, f"{block} input grad")
