"""Flash (ViR): router shapes, token compaction, and exact non-Flash behaviour when it is off."""

import dataclasses

import torch

import internvl35
from internvl35.config import FlashConfig
from internvl35.models.internvl import flash_keep_mask
from tests.conftest import tiny_config, write_tiny


def test_router_shapes_and_compaction(tmp_path, tokenizer, image):
    m = internvl35.load(write_tiny(tmp_path / "f", tokenizer))
    p = m.build_prompt("Describe.", [image, image], max_tiles=4)
    pv = p.pixel_values
    T = pv.shape[0]
    vit = m.model.vit_tokens(pv)
    assert m.model.router_logits(vit).shape == (T, 2)
    assert m.model.project_flash(vit).shape == (T, m.cfg.num_flash_token, m.cfg.text.hidden_size)
    feats, per_tile = m.model.encode_images(pv, (0.0, 0.0))
    assert sorted(set(per_tile)) == [m.cfg.num_flash_token, m.cfg.num_image_token]
    assert per_tile.count(m.cfg.num_flash_token) >= 1 and feats.shape[0] == sum(per_tile)
    ids, feats2 = m.encode(p, (0.0, 0.0))
    n_ctx = sum(1 for i in ids if i == tokenizer.img_context_id)
    assert n_ctx == sum(per_tile) and len(ids) == len(p.input_ids) - (T * m.cfg.num_image_token - n_ctx)
    logits = m.model(torch.tensor([ids]), image_features=feats2)
    assert logits.shape[1] == len(ids)


def test_single_tile_is_never_compressed(tmp_path, tokenizer):
    from PIL import Image
    m = internvl35.load(write_tiny(tmp_path / "f", tokenizer))
    p = m.build_prompt("Q", [Image.new("RGB", (112, 112))])
    ids, feats = m.encode(p, (0.0, 0.0))
    assert ids == p.input_ids and feats.shape[0] == m.cfg.num_image_token


def test_flash_off_equals_non_flash(tmp_path, tokenizer, image):
    cfg = tiny_config(tokenizer.vocab_size)
    flash_dir = write_tiny(tmp_path / "flash", tokenizer, dataclasses.replace(cfg, flash=FlashConfig(flash_mode=False)))
    plain = internvl35.load(write_tiny(tmp_path / "plain", tokenizer, dataclasses.replace(cfg, flash=None)))
    flash = internvl35.load(flash_dir)
    # same seed -> same shared weights; copy them to be independent of init order
    flash.model.load_state_dict(plain.model.state_dict(), strict=False)
    p = plain.build_prompt("Describe.", [image], max_tiles=4)
    ids = torch.tensor([p.input_ids])
    assert torch.equal(plain(ids, pixel_values=p.pixel_values), flash(ids, pixel_values=p.pixel_values))
    assert plain.chat("Describe.", [image], max_new_tokens=8) == flash.chat("Describe.", [image], max_new_tokens=8)
    # with the router on and thresholds that compress, the answer is computed from fewer tokens
    on, _ = flash.encode(flash.build_prompt("Describe.", [image], max_tiles=4), (0.0, 0.0))
    assert len(on) < len(p.input_ids)


def test_keep_mask():
    ids = torch.tensor([1] + [9] * 8 + [2])
    keep = flash_keep_mask(ids, 9, [2, 4], 4)
    assert keep.tolist() == [True, True, True, False, False, True, True, True, True, True]


def test_router_pooling_equals_released_multihead_attention_form():
    """The pooling attends with its single query in token space, without projecting keys and
    values; the released form calls nn.MultiheadAttention(query, tokens, tokens) four times. Same
    result, including with gradients (router training)."""
    from internvl35.models.projector import CrossAttentionPooling

    torch.manual_seed(0)
    pool = CrossAttentionPooling(48, num_heads=4)
    x = torch.randn(3, 16, 48, requires_grad=True)
    q = pool.query_token.expand(3, 1, -1)
    q = pool.norm1(pool.attn1(q, x, x, need_weights=False)[0])
    for _ in range(3):
        q = pool.norm2(pool.attn2(q, x, x, need_weights=False)[0])
    ours = pool(x)
    torch.testing.assert_close(ours, q[:, 0], rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(q[:, 0].square().sum(), [x, pool.attn2.in_proj_weight])
    g_ours = torch.autograd.grad(ours.square().sum(), [x, pool.attn2.in_proj_weight])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_requests_encoded_together_equal_one_by_one(tmp_path, tokenizer, image):
    """Routed and plain requests in one pass: the router decides per request and each projector runs
    once over the tiles it serves; every request gets what it gets alone."""
    from PIL import Image

    cm = internvl35.load(write_tiny(tmp_path / "f", tokenizer))
    m = cm.model
    noise = Image.fromarray(torch.randint(0, 256, (300, 110, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    a, b = (cm.build_prompt("Q", [im], max_tiles=6).pixel_values for im in (image, noise))
    reqs = [a, b[:2], b, a[:1], a]
    flash = [(0.0, 0.0), None, (0.5, 0.0), (0.0, 0.0), (0.3, 0.0)]
    together = m.encode_requests(reqs, flash)
    alone = [m.encode_images(r, f) for r, f in zip(reqs, flash)]
    assert [t[1] for t in together] == [a[1] for a in alone]
    assert all(torch.allclose(t[0], a[0], atol=1e-6) for t, a in zip(together, alone))
    assert together[0][1].count(m.cfg.num_flash_token) >= 1 and set(together[1][1]) == {m.cfg.num_image_token}
