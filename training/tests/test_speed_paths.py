"""The engine's speed paths compute what the plain paths compute: length-grouped batch order, trimmed widths, and
the autocast-aware grouped-mm MoE experts (checked on the CPU under bf16 autocast)."""
import pytest
import torch

from training.loop import epoch_order, row_lengths, trim_padding
from training.model import GPU_EXPERTS, build_model
from training.spec import model_config, resolve_config


def padded_rows(n=1000, width=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, width + 1, (n,), generator=gen)
    x = torch.randint(3, 100, (n, width), generator=gen)
    x[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    return {"x": x, "y": x.masked_fill(x == 0, -100)}, lengths


def test_grouped_order_is_a_seeded_permutation_with_less_padding():
    data, lengths = padded_rows()
    assert torch.equal(row_lengths(data), lengths)
    plain = epoch_order(1000, 16, 42, 0)
    grouped = epoch_order(1000, 16, 42, 0, lengths)
    assert sorted(grouped.tolist()) == list(range(1000))
    assert torch.equal(grouped, epoch_order(1000, 16, 42, 0, lengths))  # resume relies on this
    assert not torch.equal(grouped, epoch_order(1000, 16, 42, 1, lengths))

    def computed(order):
        return sum(trim_padding({k: v[order[i:i + 16]] for k, v in data.items()}, 1)["x"].numel()
                   for i in range(0, 1000, 16))
    assert computed(grouped) < 0.75 * computed(plain)


def test_rows_of_one_length_keep_the_plain_shuffle():
    assert torch.equal(epoch_order(100, 8, 1, 0, torch.full((100,), 64)), epoch_order(100, 8, 1, 0))


def test_trimmed_width_is_rounded_up_but_never_past_the_row():
    data, _ = padded_rows(4, 96)
    real = int(row_lengths(data).max())
    assert trim_padding(data, 1)["x"].shape[1] == real
    assert trim_padding(data, 64)["x"].shape[1] == min(-(-real // 64) * 64, 96)
    assert trim_padding(data, 64)["y"].shape == trim_padding(data, 64)["x"].shape


@pytest.mark.parametrize("autocast", [False, True])
def test_autocast_grouped_experts_match_the_eager_experts(autocast):
    mcfg = model_config(resolve_config("pretrain", {"hidden_size": 64, "num_hidden_layers": 2, "use_moe": True}))
    torch.manual_seed(0)
    eager = build_model(mcfg)
    fast = build_model(mcfg, GPU_EXPERTS)
    fast.load_state_dict(eager.state_dict())
    x = torch.randint(3, 6400, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a, b = eager(input_ids=x, labels=x).loss, fast(input_ids=x, labels=x).loss
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), abs=1e-2 if autocast else 1e-5)
    g_eager = eager.model.layers[0].mlp.experts.gate_up_proj.grad
    g_fast = fast.model.layers[0].mlp.experts.gate_up_proj.grad
    assert g_fast.dtype == torch.float32  # the master weights stay fp32
    assert ((g_fast - g_eager).norm() / g_eager.norm()).item() < (3e-2 if autocast else 1e-5)
