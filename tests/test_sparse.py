"""N:M pattern checks and the 2:4 semi-structured export (td.to_semi_structured).

On a machine without CUDA every layer must stay dense with the reasons spelled out; the
conversion itself runs only on a CUDA GPU of compute capability 8.x/9.x (marked ``cuda``)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import td_kernels as td
from td_kernels.sparsity.sparse import semi_structured_unsupported


def nm_violations_loop(w, n, m):
    """Independent count: a plain loop over rows and groups."""
    w2 = w.reshape(w.shape[0], -1).tolist()
    return sum(sum(v != 0 for v in row[g:g + m]) > n for row in w2 for g in range(0, len(row), m))


@pytest.mark.parametrize("shape,n,m", [((8, 16), 2, 4), ((5, 3, 4), 1, 4), ((6, 24), 3, 8), ((4, 2, 3, 3), 1, 2)])
def test_nm_pattern_check(shape, n, m):
    w = torch.randn(shape)
    w.view(-1)[::7] = 0
    assert td.nm_violations(w, n, m) == nm_violations_loop(w, n, m) > 0
    assert not td.is_nm_sparse(w, n, m)
    pruned = td.prune_nm(w, n=n, m=m)
    assert td.is_nm_sparse(pruned, n, m) and td.nm_violations(pruned, n, m) == 0
    assert nm_violations_loop(pruned, n, m) == 0


def test_nm_pattern_bad_input():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="m=3 must divide the fan-in"):
        td.nm_violations(w, 2, 3)
    with pytest.raises(ValueError, match="1 <= n < m"):
        td.nm_violations(w, 4, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        td.nm_violations(w, 2.0, 4)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        td.nm_violations(torch.randn(8), 2, 4)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        td.is_nm_sparse([[1.0, 0.0]], 1, 2)


def _model(dtype=torch.float32):
    m = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    with torch.no_grad():
        m[2].weight.copy_(td.prune_nm(m[2].weight, n=2, m=4))
    return m.to(dtype)


def test_cpu_refuses_and_keeps_dense():
    model = _model(torch.float16)
    before = [p.clone() for p in model.parameters()]
    report = td.to_semi_structured(model)
    assert report.converted == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    by_name = {s.name: s for s in report.layers}
    assert [r.split(":")[0] for r in by_name["2"].reasons] == ["the weight is on cpu"]
    assert "run on CUDA GPUs only" in by_name["2"].reasons[0]
    assert any("not 2:4 sparse" in r and "td.prune_nm" in r for r in by_name["0"].reasons)
    assert any("smaller than min_features=1024" in r for r in by_name["0"].reasons)
    assert any("shape 10x1024 is not a multiple of" in r for r in by_name["4"].reasons)
    assert "2 [1024x1024 float16 cpu]: dense: the weight is on cpu" in str(report)


def test_refusal_messages():
    report = td.to_semi_structured(_model(torch.float32))
    assert any("float32: 2:4 kernels take float16 or bfloat16" in r for r in report.layers[1].reasons)
    report = td.to_semi_structured(_model(torch.bfloat16), min_features=4096)
    assert any("smaller than min_features=4096" in r for r in report.layers[1].reasons)
    model = _model(torch.float16)
    prune.identity(model[2], "weight")
    assert "make pruning permanent first" in td.to_semi_structured(model).layers[1].reasons[0]
    assert td.to_semi_structured(_model(), exclude=["2"]).layers[1].reasons == ["excluded"]
    assert semi_structured_unsupported("cpu").startswith("the weight is on cpu")
    assert str(td.to_semi_structured(nn.ReLU())) == "no nn.Linear layers"


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        td.to_semi_structured(torch.randn(4, 4))
    with pytest.raises(ValueError, match="min_features must be a non-negative int"):
        td.to_semi_structured(_model(), min_features=-1)
    with pytest.raises(ValueError, match="exclude names 'fc'"):
        td.to_semi_structured(_model(), exclude=["fc"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or semi_structured_unsupported("cuda") is not None,
                    reason="needs a CUDA GPU with 2:4 sparse tensor cores (sm_8x/sm_9x)")
def test_cuda_converts_2_4_layers():
    from torch.sparse import SparseSemiStructuredTensor

    model = _model(torch.float16).cuda().eval()
    x = torch.randn(256, 64, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        dense = model(x)
    report = td.to_semi_structured(model)
    assert report.converted == ["2"]
    assert isinstance(model[2].weight, SparseSemiStructuredTensor)
    assert not isinstance(model[0].weight, SparseSemiStructuredTensor)
    with torch.inference_mode():
        sparse = model(x)
    # same products, another accumulation order in float16 (fp32 accumulators): a few fp16 ulps
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)
