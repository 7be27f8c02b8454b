"""Packed SFT and DPO rows (several conversations per row, attention within each): every token's loss and the
batch's loss equal the unpacked batch's, on a fixed batch of the demo data."""
import pytest
import torch

from training import rows
from training.chat import load_hf_tokenizer
from training.dpo import make_loss
from training.model import build_model
from training.pretrain import lm_loss
from training.records import iter_records
from training.spec import model_config, resolve_config

from .conftest import ARCH


def _batches(demo_dir, processing, data, n=16, msl=256):
    tok = load_hf_tokenizer(str(demo_dir / "demo-tokenizer"))
    cfg = {**resolve_config("sft" if processing == "sft" else "dpo", {"max_seq_len": msl}),
           "system_prompt_ratio": 0.0, "empty_think_drop_ratio": 0.0}
    recs = [r for _, r in iter_records(demo_dir / f"{data}.jsonl", None, n)]
    if processing == "sft":  # conversations of 1 to 4 rounds: lengths as varied as real SFT data's
        recs = [{**r, "conversations": r["conversations"] * (i % 4 + 1)} for i, r in enumerate(recs)]
    plain = rows.from_records(tok, processing, recs, {**cfg, "packing": False}).all()
    packed = rows.from_records(tok, processing, recs, {**cfg, "packing": True}).all()
    return plain, packed


def _model(seed=0, moe=False):
    torch.manual_seed(seed)
    return build_model(model_config(resolve_config("pretrain", {**ARCH, "use_moe": moe}))).float().eval()


def _token_losses(model, batch):
    """{(sequence, position in it): CE of that label} for a padded or a packed batch."""
    from training.model import packed_inputs

    with torch.no_grad():
        logits = model(input_ids=batch["x"], **packed_inputs(batch)).logits[:, :-1]
    labels = batch["y"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels.shape)
    out = {}
    for r in range(labels.shape[0]):
        for c in range(labels.shape[1]):
            if labels[r, c] != -100:
                key = ((int(batch["doc"][r, c + 1]) - 1, int(batch["pos"][r, c + 1])) if "doc" in batch
                       else (r, c + 1))
                out[key] = float(ce[r, c])
    return out


def test_packed_sft_loss_equals_the_unpacked_loss_token_by_token(demo_dir):
    plain, packed = _batches(demo_dir, "sft", "demo-sft")
    assert len(packed["x"]) < len(plain["x"])  # several conversations per row
    assert packed["x"].numel() < plain["x"].numel()  # less padding computed
    assert int((packed["y"] != -100).sum()) == int((plain["y"] != -100).sum())
    model = _model()
    a, b = _token_losses(model, plain), _token_losses(model, packed)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5
    with torch.no_grad():
        loss_plain, _ = lm_loss(model, plain)
        loss_packed, _ = lm_loss(model, packed)
    assert abs(float(loss_plain) - float(loss_packed)) < 1e-6


def test_packed_dpo_loss_equals_the_unpacked_loss(demo_dir):
    plain, packed = _batches(demo_dir, "dpo", "demo-dpo")
    assert len(packed["x"]) < len(plain["x"]) + len(plain["xr"])
    policy, reference = _model(0), _model(1)
    loss_fn = make_loss(reference, beta=0.15)
    with torch.no_grad():
        a, pa = loss_fn(policy, plain)
        b, pb = loss_fn(policy, packed)
    assert abs(float(a) - float(b)) < 1e-6
    assert abs(float(pa["reward_margin"]) - float(pb["reward_margin"])) < 1e-5


def test_packed_gradients_equal_the_unpacked_ones(demo_dir):
    plain, packed = _batches(demo_dir, "sft", "demo-sft", n=8)
    grads = []
    for batch in (plain, packed):
        model = _model().train()
        loss, _ = lm_loss(model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_packed_distillation_loss_equals_the_unpacked_loss(demo_dir):
    """Student and teacher (another size, MoE) both read the packed rows: CE, KL and the loss are the unpacked ones."""
    from training.distill import make_loss as distill_loss
    from training.model import build_model

    plain, packed = _batches(demo_dir, "sft", "demo-sft")
    torch.manual_seed(1)
    teacher = build_model(model_config(resolve_config("pretrain", {**ARCH, "hidden_size": 96, "use_moe": True}))).float()
    loss_fn = distill_loss(teacher, alpha=0.5, temperature=1.5)
    student = _model()
    with torch.no_grad():
        a, pa = loss_fn(student, plain)
        b, pb = loss_fn(student, packed)
    assert abs(float(a) - float(b)) < 1e-6
    assert abs(float(pa["distill"]) - float(pb["distill"])) < 1e-6 and abs(float(pa["ce"]) - float(pb["ce"])) < 1e-6


def test_packed_rows_through_flexattention_give_the_unpacked_loss(demo_dir):
    """``packed_attention: flex`` (CUDA; timed by bench/train_throughput.py's sft_packed_flex): the block mask
    replaces the dense one and every token's loss is still the unpacked batch's (the forward pass, on the CPU:
    FlexAttention has no backward there), for SFT and for DPO's chosen/rejected sequences."""
    from training.model import block_mask

    model = _model()
    plain, packed = _batches(demo_dir, "sft", "demo-sft")
    flex = {**packed, "block_mask": block_mask(packed["doc"])}
    a, b = _token_losses(model, plain), _token_losses(model, flex)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5
    plain, packed = _batches(demo_dir, "dpo", "demo-dpo")
    loss_fn = make_loss(_model(1), beta=0.15)
    with torch.no_grad():
        a, _ = loss_fn(model, plain)
        b, _ = loss_fn(model, {**packed, "block_mask": block_mask(packed["doc"])})
    assert abs(float(a) - float(b)) < 1e-5
    assert resolve_config("sft", {})["packed_attention"] == "mask"  # until a GPU measures flex faster
    assert resolve_config("sft", {"packed_attention": "flex"})["packed_attention"] == "flex"
    from training.spec import SpecError

    with pytest.raises(SpecError, match="packed_attention.*mask, flex"):
        resolve_config("sft", {"packed_attention": "varlen"})


def test_a_flex_job_on_the_cpu_trains_with_the_mask(make_spec, demo_dir, engine):
    """``packed_attention: flex`` asks for FlexAttention, which has no backward on the CPU: there the packed rows keep
    the dense mask and the job trains (and evaluates) as with ``mask``."""
    import json

    path = make_spec(max_steps=3, eval_interval=3, packed_attention="flex")
    spec = json.loads(path.read_text())
    spec.update(stage="sft", dataset=str(demo_dir / "demo-sft.jsonl"))
    path.write_text(json.dumps(spec))
    rc, events, other = engine(path)
    assert rc == 0, other
    assert [e["step"] for e in events if e["event"] == "eval"] == [3]


@pytest.mark.parametrize("stage", ["sft", "lora", "dpo", "distill"])
def test_packing_is_the_default_where_it_is_exact(stage):
    assert resolve_config(stage, {})["packing"] is True
