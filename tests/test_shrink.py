"""td.shrink_model: the shrunk model computes what the pruned one does (eval mode), with fewer
parameters, and reports every zero unit it left and why.

Tolerances. Removing a unit removes terms ``W[:, j] * x_j`` that are exactly 0 (or moves a
constant ``W[:, j] * c`` into the bias, summed in float64), so the only difference is float
rounding: the matmuls add the remaining terms in another order/blocking and the folded constant
is rounded once instead of inside the sum. Per layer that is a few ulps of the partial sums'
magnitude, growing at most linearly with depth. We compare relative to the output's scale:
float64 at 1e-12 (eps 2.2e-16 x fan-in <= 600 x depth <= 20 is about 3e-12 worst case, far below in
practice), float32 at 1e-4 (eps 1.2e-7, same argument, ResNet-18 depth). A wrong rule (an
unfolded bias, a mis-mapped channel) moves outputs by the size of a weight times an activation,
about 1e-2 of the scale here: each check can fail.
"""
import pytest
import torch
from torch import nn

import td_kernels as td
from td_kernels.tools.demo import make_model
from td_kernels.sparsity.shrink import zero_units

pytest.importorskip("torch_pruning")  # `make .venv/.built` installs it


def close(a, b, rel):
    scale = b.abs().max().item()
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"max |diff| {err:.3g} > {rel:g} x scale {scale:.3g}"


def params(model):
    return sum(p.numel() for p in model.parameters())


def zero_rows(layer, idxs):
    with torch.no_grad():
        layer.weight[idxs] = 0


def randomize_bn(model, positive_shift=0.0):
    """Trained-looking BatchNorm statistics and affine parameters (so a zero unit's constant
    output bn(b) is not 0 unless the shift makes it so)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5).add_(positive_shift)


# --- the demo's models ----------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.5, 0.8])
def test_demo_mlp_prune_model(rate):
    model = make_model("mlp").double().eval()
    td.prune_model(model, rate, mode="unit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    close(small(x), model(x), 1e-12)
    assert report.max_abs_diff <= 1e-12 * report.output_scale
    # hidden widths: the units that were not zero, the logits layer untouched
    k1, k2 = (128 - len(zero_units(model[i].weight)) for i in (1, 3))
    assert (small[1].out_features, small[3].in_features, small[3].out_features, small[5].in_features) == (k1, k1, k2, k2)
    assert params(small) == report.params_after == (64 + 1) * k1 + (k1 + 1) * k2 + (k2 + 1) * 10
    assert report.params_before == params(model)
    assert report.left == []


def test_demo_mlp_plain_zero_weights_and_biases():
    """Zeros written into plain weights (no prune mask), biases all non-zero: positive ones give
    relu(b) > 0, which the next Linear's bias absorbs; negative ones give 0."""
    model = make_model("mlp").double().eval()
    with torch.no_grad():
        for i in (1, 3):
            model[i].weight.copy_(td.prune_units(model[i].weight, 0.7))
            model[i].bias.copy_(torch.linspace(-0.3, 0.3, 128, dtype=torch.float64)[torch.randperm(128)])
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-12)
    assert report.folded == ["3", "5"]
    assert report.layer("1").removed == report.layer("1").zero_units == 89
    # the folds moved the biases by far more than the tolerance: without them the test fails
    wrong = small[5].bias.detach() - model[5].bias.detach()
    assert wrong.abs().max() > 1e-3


def test_mlp_batchnorm_between_folds_exactly():
    model = nn.Sequential(nn.Linear(12, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 30), nn.BatchNorm1d(30),
                          nn.Tanh(), nn.Linear(30, 5)).double().eval()
    randomize_bn(model, positive_shift=0.3)
    zero_rows(model[0], list(range(0, 40, 3)))
    zero_rows(model[3], [1, 2, 3, 29])
    x = torch.randn(20, 12, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-12)
    assert (small[0].out_features, small[1].num_features, small[3].in_features) == (26, 26, 26)
    assert (small[3].out_features, small[4].num_features, small[6].in_features) == (26, 26, 26)
    assert set(report.folded) == {"3", "6"}


def test_demo_cnn_zero_padded_consumer():
    """conv1's zero units feed conv2 (3x3, zero padding): relu(b) = 0 units go, relu(b) > 0
    units stay (no bias reproduces a constant cut off at the border); conv2's units feed a Linear
    through max-pool and flatten, so all of them go, with their constants folded."""
    model = make_model("cnn").double().eval()
    zero_rows(model[0], list(range(8)))
    with torch.no_grad():
        model[0].bias[:8] = torch.tensor([-0.2, 0.3, -0.1, 0.2, -0.3, 0.1, -0.05, 0.4], dtype=torch.float64)
        model[2].weight.copy_(td.prune_units(model[2].weight, 0.5))
        model[2].bias.uniform_(-0.2, 0.2)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-12)
    assert small[0].out_channels == 16 - 4 and small[2].in_channels == 12
    assert small[2].out_channels == 16 and small[6].in_features == 16 * 4 * 4
    ((name, n, reason),) = report.left
    assert name == "0" and n == 4 and "zero-padded convolution 2" in reason
    assert "6" in report.folded


def test_conv_bn_into_unpadded_conv_folds():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3)).double().eval()
    randomize_bn(model, positive_shift=0.5)
    zero_rows(model[0], [0, 5, 6, 15])
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-12)
    assert small[0].out_channels == 12 and small[1].num_features == 12 and small[3].in_channels == 12
    assert report.folded == ["3"] and report.left == []


def test_conv_bias_created_when_consumer_has_none():
    model = nn.Sequential(nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 3, bias=False)).double().eval()
    zero_rows(model[0], [2, 7])
    x = torch.randn(5, 6, dtype=torch.float64)
    small, _ = td.shrink_model(model, x)
    assert small[2].bias is not None and small[2].in_features == 8
    close(small(x), model(x), 1e-12)


def test_not_constant_channel_is_kept():
    """Average pooling with zero padding turns a constant channel into one that is smaller at the
    border: the next 1x1 convolution sees it vary over positions, so the unit stays. (Into a
    Linear after flattening, each position is its own feature with its own constant, and the
    unit goes.)"""
    def model_into(head):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 1, padding=1), *head).double()

    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    for head, kept in (((nn.Conv2d(4, 2, 1),), 3), ((nn.Flatten(), nn.Linear(4 * 36, 2)), 2)):
        model = model_into(head).eval()
        zero_rows(model[0], [1, 2])
        with torch.no_grad():
            model[0].bias[1], model[0].bias[2] = 0.5, -0.5  # relu: 0.5 (pooled: not constant) and 0
        small, report = td.shrink_model(model, x)
        close(small(x), model(x), 1e-12)
        assert small[0].out_channels == kept
        if kept == 3:
            ((_, n, reason),) = report.left
            assert n == 1 and "not constant" in reason


def test_layernorm_group_left_masked():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 2)).double().eval()
    zero_rows(model[0], [0, 1])
    zero_rows(model[3], [4])
    x = torch.randn(6, 8, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-12)
    assert small[0].out_features == 16 and small[3].out_features == 15
    ((name, n, reason),) = report.left
    assert name == "0" and n == 2 and "LayerNorm" in reason


def test_all_zero_layer_keeps_one_unit():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    zero_rows(model[0], list(range(6)))
    x = torch.randn(3, 4, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    assert small[0].out_features == 1
    close(small(x), model(x), 1e-12)
    assert report.left[0][1] == 1 and "every unit is zero" in report.left[0][2]


def test_exclude_and_train_mode_kept():
    model = make_model("mlp").double().train()
    zero_rows(model[1], [0, 1, 2])
    zero_rows(model[3], [5, 6])
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    small, report = td.shrink_model(model, x, exclude=["3"])
    assert small.training and model.training
    # "3" keeps its shape: its own units and the units feeding it stay
    assert small[1].out_features == 128 and small[3].out_features == 128
    assert report.left == [("1", 3, "coupled with the excluded layer 3"), ("3", 2, "excluded")]
    small, report = td.shrink_model(model, x, exclude=[model[5]])  # a module works too
    assert small[1].out_features == 125 and small[3].out_features == 128
    close(small.eval()(x), model.eval()(x), 1e-12)


# --- ResNet-18 (torchvision's layout, defined here: PyPI's torchvision does not import beside
# this CPU torch 2.13 build: "operator torchvision::nms does not exist") -----------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, width=64, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i in range(4):
            cout = width * 2 ** i
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2),
                                                         BasicBlock(cout, cout, 1)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_resnet18_residual_group_removed_together():
    """Channels zero in every member of a residual sum (stem conv and layer1's second convs) go,
    BatchNorms and the consuming convs included; layer2's are zero in only one member and stay."""
    model = ResNet18(width=8).eval()
    for conv in (model.conv1, model.layer1[0].conv2, model.layer1[1].conv2):
        zero_rows(conv, [0, 3, 5])
    zero_rows(model.layer2[0].conv2, [1, 2])
    zero_rows(model.layer2[1].conv1, [0, 1, 2, 3])  # inside a block: its own group
    x = torch.randn(2, 3, 32, 32)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-4)
    assert small.conv1.out_channels == small.bn1.num_features == 5
    assert small.layer1[0].conv1.in_channels == small.layer1[1].conv2.out_channels == 5
    assert small.layer2[0].conv1.in_channels == small.layer2[0].downsample[0].in_channels == 5
    assert small.layer2[1].conv1.out_channels == small.layer2[1].bn1.num_features == small.layer2[1].conv2.in_channels == 12
    assert small.layer2[0].conv2.out_channels == 16
    (left,) = [e for e in report.left if e[0] == "layer2.0.conv2"]
    assert left[1] == 2 and "residual" in left[2]
    assert params(small) < params(model)


def test_resnet18_prune_model_random_bn():
    """td.prune_model per layer (masks disagree across residual members) with trained-looking
    BatchNorms: what is removed keeps the output; what is left is reported."""
    model = ResNet18(width=8).eval()
    randomize_bn(model)
    td.prune_model(model, 0.5, mode="unit")
    x = torch.randn(2, 3, 32, 32)
    small, report = td.shrink_model(model, x)
    close(small(x), model(x), 1e-4)
    assert report.removed_units > 0 and report.left
    zero = sum(s.zero_units for s in report.layers)
    assert report.removed_units + sum(n for _, n, _ in report.left) == zero
    assert params(small) == report.params_after < report.params_before


# --- transformers' Llama --------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_llama_mlp_units_and_kv_groups(llama):
    L0, L1 = llama.model.layers
    zero_rows(L0.mlp.gate_proj, list(range(20)))
    zero_rows(L0.mlp.up_proj, list(range(20)))      # 20 units zero in both: go
    zero_rows(L0.mlp.gate_proj, [30, 31, 32])        # gate only: masks disagree, stay
    zero_rows(L1.mlp.up_proj, list(range(47, 0, -2)))
    zero_rows(L1.mlp.gate_proj, list(range(47, 0, -2)))
    zero_rows(L1.self_attn.v_proj, list(range(8, 16)))  # KV group 1 of layer 1: silent
    zero_rows(L0.self_attn.v_proj, [0, 1, 2])           # part of a head: stays
    zero_rows(L0.self_attn.q_proj, list(range(8)))      # a query head: not silent, stays
    ids = torch.randint(0, 64, (2, 7))
    small, report = td.shrink_model(llama, {"input_ids": ids, "use_cache": False})
    close(small(input_ids=ids).logits, llama(input_ids=ids).logits, 1e-12)
    S0, S1 = small.model.layers
    assert S0.mlp.gate_proj.out_features == S0.mlp.up_proj.out_features == S0.mlp.down_proj.in_features == 28
    assert S1.mlp.down_proj.in_features == 24
    a = S1.self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == (16, 8, 8, 16)
    assert a.q_proj.out_features // a.k_proj.out_features == 4 // 2  # GQA ratio kept
    assert report.heads == [("model.layers.1.self_attn", 1, 2, 2)]
    # MLP units: a gate row, an up row and a down column each (hidden 32); the KV group: 8 key,
    # 8 value and 16 query rows of 32, and 16 input columns of o_proj's 32 rows
    mlp, attn = (20 + 24) * 3 * 32, (8 + 8 + 16) * 32 + 32 * 16
    assert report.params_before - report.params_after == params(llama) - params(small) == mlp + attn
    left = {(n, r.split(" ")[0]) for n, _, r in report.left}
    assert ("model.layers.0.mlp.gate_proj", "coupled") in left
    assert {n for n, _, _ in report.left} >= {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    # the KV cache follows the new layout: incremental decoding equals the full forward
    out = small(input_ids=ids[:, :6], use_cache=True)
    step = small(input_ids=ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    close(step[:, -1], llama(input_ids=ids).logits[:, -1], 1e-12)


def test_gpt2_mlp_units_removed_every_layer_reported_targeted_dropout_kept():
    """GPT-2's MLP is Conv1D (units along dim 1): unit-pruned, its c_fc units go (their constant
    gelu(bias) folded into c_proj's bias); every registered layer has a row, and each zero unit
    is removed or left with a reason. A targeted model shrinks with targeted dropout kept."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    td.prune_model(model, 0.5, mode="unit")
    td.apply_targeted_dropout(model, 0.5, 0.5)
    ids = torch.randint(0, 50, (3, 8))
    small, report = td.shrink_model(model, {"input_ids": ids, "use_cache": False})
    assert [s.name for s in report.layers] == [n for n, m in model.named_modules() if td.nn.layer_type(m)]
    for s in report.layers:
        assert s.removed + sum(s.left.values()) == s.zero_units, s
    for i in range(2):
        assert report.layer(f"transformer.h.{i}.mlp.c_fc").removed == 64  # half of 128
        assert report.layer(f"transformer.h.{i}.attn.c_attn").left  # fused q/k/v: reported, kept
        mlp = small.transformer.h[i].mlp
        assert mlp.c_fc.weight.shape == (32, 64) and mlp.c_proj.weight.shape == (64, 32)
    other = torch.randint(0, 50, (2, 8))  # the fold does not depend on example_inputs
    close(small(other).logits, model(other).logits, 1e-12)
    fc = small.transformer.h[0].mlp.c_fc
    assert fc.targeted_dropout._shape == (64, 32) and fc.weight.t().is_contiguous()  # re-attached, units first
    small.train()
    small(ids, labels=ids).loss.backward()
    assert fc.weight.grad.shape == (32, 64)


# --- bad input ------------------------------------------------------------------------------

def test_bad_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        td.shrink_model(lambda t: t, x)
    with pytest.raises(TypeError, match="example_inputs must be"):
        td.shrink_model(model, 3.0)
    with pytest.raises(ValueError, match="example_inputs: the model failed"):
        td.shrink_model(model, torch.randn(2, 5))
    with pytest.raises(ValueError, match="example_inputs: the model failed"):
        td.shrink_model(model, {"nope": x})
    with pytest.raises(ValueError, match="exclude names 'fc'"):
        td.shrink_model(model, x, exclude=["fc"])
    with pytest.raises(TypeError, match="exclude must hold"):
        td.shrink_model(model, x, exclude=[3])
    with pytest.raises(TypeError, match="verify must be a bool"):
        td.shrink_model(model, x, verify=1)
    model[0].register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="layer '0' has forward hooks"):
        td.shrink_model(model, x)


def test_bench_inference_smoke(tmp_path):
    """The CPU benchmark's rows: the dense baseline and one shrunk variant, timed interleaved."""
    from td_kernels.tools.bench import inference as bench_inference

    rows = bench_inference.run_cpu(["mlp"], [0.5], [2], reps=2, block_s=0.001, threads=1, progress=lambda s: None)
    assert [r["variant"] for r in rows] == ["dense", "shrunk 50%"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["params"] < rows[0]["params"] and rows[1]["reps"] == 2
    bench_inference.write_csv(rows, tmp_path / "x.csv", "header")
    assert (tmp_path / "x.csv").read_text().startswith("# header\nmodel,batch,variant")


def test_torch_prune_mask_is_read_and_model_untouched():
    """A weight behind torch.nn.utils.prune (weight_orig * weight_mask, a non-leaf ``weight``
    that plain deepcopy refuses): the mask's zero rows are the units removed."""
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 4)).double().eval()
    mask = torch.ones(12, 5, dtype=torch.float64)
    mask[[1, 4, 9]] = 0
    prune.custom_from_mask(model[0], "weight", mask)
    x = torch.randn(7, 5, dtype=torch.float64)
    small, report = td.shrink_model(model, x)
    assert hasattr(model[0], "weight_orig") and model[0].weight_orig.shape == (12, 5)
    assert not hasattr(small[0], "weight_orig") and small[0].out_features == 9 == small[2].in_features
    close(small(x), model(x), 1e-12)
