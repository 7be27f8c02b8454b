"""The engine's speed paths compute what the plain paths compute: length-grouped batch order, trimmed widths, the
autocast-aware grouped-mm MoE experts (checked on the CPU under bf16 autocast), the fused projections and attention,
and compiled training with the gradient buffers that CUDA graphs need."""
import pytest
import torch

from training.loop import compile_for_training, resume_position, row_lengths, trim_padding
from training.rows import epoch_order
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


@pytest.mark.parametrize("before, after", [((16, 1), (8, 1)), ((8, 2), (8, 1)), ((8, 2), (6, 1))])
def test_a_grouped_epoch_resumed_with_another_global_batch_still_sees_every_row_once(before, after):
    """Half the batch (an out-of-memory retry), another GPU count: the resumed epoch keeps the order it was drawn
    with and continues at the same row, although grouping by length depends on the global batch."""
    _, lengths = padded_rows()
    (bs, world), (new_bs, new_world) = before, after
    drawn = epoch_order(1000, bs * world, 42, 0, lengths)
    assert not torch.equal(drawn, epoch_order(1000, new_bs * new_world, 42, 0, lengths))
    ck = {"config": {"batch_size": bs}, "world_size": world, "micro": 24}
    micro, order_bs = resume_position(ck, new_bs * new_world, 1000)
    resumed = epoch_order(1000, order_bs, 42, 0, lengths)
    seen = drawn[:24 * bs * world].tolist() + resumed[micro * new_bs * new_world:].tolist()
    assert len(seen) == 1000 + 24 * bs * world % (new_bs * new_world) and set(seen) == set(range(1000))
    end = {**ck, "micro": -(-1000 // (bs * world))}  # saved after the epoch's last batch: nothing is run again
    assert resume_position(end, new_bs * new_world, 1000)[0] == -(-1000 // (new_bs * new_world))


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


@pytest.mark.parametrize("use_moe", [False, True])
def test_fused_projections_and_repeat_kv_attention_match_transformers(use_moe):
    """The engine's model (one q/k/v matmul, one gate/up matmul, MiniMind's repeat-kv causal SDPA call) gives
    transformers' own Qwen3 results: logits, loss, gradients, greedy generation with a KV cache, and state-dict keys."""
    mcfg = model_config(resolve_config("pretrain", {"hidden_size": 64, "num_hidden_layers": 2, "use_moe": use_moe}))
    torch.manual_seed(0)
    plain = build_model(mcfg, fused=False, attention="sdpa")
    ours = build_model(mcfg)
    assert type(ours.model.layers[0].self_attn).__name__.startswith("Fused")
    assert ours.config._attn_implementation == "sdpa_repeat_kv"
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    x = torch.randint(3, 6400, (3, 40))
    a, b = plain(input_ids=x, labels=x), ours(input_ids=x, labels=x)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    with torch.no_grad():
        prompt = x[:1, :6]
        assert torch.equal(plain.generate(prompt, max_new_tokens=6, do_sample=False),
                           ours.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("target", ["q_proj", "v_proj", "up_proj"])
def test_fused_projections_leave_lora_wrapped_layers_to_peft(target):
    """With peft's LoRA on a projection the fused path steps aside: the adapter changes the output (B set non-zero)."""
    from peft import LoraConfig, get_peft_model

    mcfg = model_config(resolve_config("pretrain", {"hidden_size": 64, "num_hidden_layers": 2}))
    torch.manual_seed(0)
    model = build_model(mcfg)
    x = torch.randint(3, 6400, (2, 16))
    with torch.no_grad():
        before = model(input_ids=x).logits
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
        after = lora(input_ids=x).logits
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_gradient_buffers_for_cuda_graphs_train_exactly_as_dropped_gradients():
    """With CUDA graphs the gradients accumulate in buffers of their own that zero_grad zeroes instead of dropping;
    two optimizer steps of two accumulated micro-steps each end in the same losses and weights as with gradients
    dropped after each step (the default mode's handling). Both runs compile in the CUDA graphs' mode, so that only
    the gradient handling differs and the second compilation is found in inductor's cache (a cold compilation of
    each mode took 30-40 s of the suite on two cores); one layer: the handling is the same for every layer."""
    cfg = model_config(resolve_config("pretrain", {"hidden_size": 64, "num_hidden_layers": 1}))
    batches = [torch.randint(3, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(4)]

    def train(graphs):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        step_model = compile_for_training(model, "reduce-overhead")
        if not graphs:
            for p in model.parameters():
                p.grad = None  # as the default mode leaves them: created by the first backward, dropped by zero_grad
        else:
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(2):
            for x in batches[step * 2:step * 2 + 2]:
                loss = step_model(input_ids=x, labels=x).loss
                (loss / 2).backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=not graphs)
        return model, losses

    plain, plain_losses = train(False)
    kept, kept_losses = train(True)
    assert kept_losses == plain_losses
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        assert torch.equal(a, b), name
        assert b.grad is not None and not b.grad.any(), name  # kept, zeroed: the backward adds into it


def test_compile_tuning_turns_on_inductors_coordinate_descent():
    """``compile_tuning`` (the bench's --coordinate-descent: 30.4 % MFU on an H100, docs/performance.md) is inductor's
    own setting, read when a kernel is generated; off unless asked for."""
    import torch._inductor.config as inductor_config

    model = build_model(model_config(resolve_config("pretrain", {"hidden_size": 64, "num_hidden_layers": 2})))
    # inductor's own patch, not pytest's monkeypatch: its undo left the setting missing ("does not exist") for every
    # later compile in the session (test_packing's FlexAttention, when it ran after this file)
    with inductor_config.patch(coordinate_descent_tuning=False):
        compile_for_training(model, "default")
        assert inductor_config.coordinate_descent_tuning is False
        compile_for_training(model, "default", tuning=True)
        assert inductor_config.coordinate_descent_tuning is True


def test_time_estimate_follows_the_compile_settings_the_engine_applies():
    from training.estimate import estimate_seconds

    def seconds(stage="pretrain", gpus=1, **config):
        return estimate_seconds(stage, resolve_config(stage, {"max_steps": 1000, **config}), 10**6, gpus)

    eager, compiled = seconds(), seconds(use_compile=True)
    graphs = seconds(use_compile=True, compile_mode="reduce-overhead")
    tuned = seconds(use_compile=True, compile_mode="reduce-overhead", compile_tuning=True)
    assert eager > compiled > graphs > tuned
    assert eager / tuned == pytest.approx(282 / 112, rel=0.01)  # the measured H100 rates (docs/performance.md)
    # the engine compiles without CUDA graphs on several GPUs and for RL, and the estimate knows it
    assert seconds(gpus=2, use_compile=True, compile_mode="reduce-overhead") == seconds(gpus=2, use_compile=True)
    assert (seconds("grpo", use_compile=True, compile_mode="reduce-overhead")
            == seconds("grpo", use_compile=True))
