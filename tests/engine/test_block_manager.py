from internvl35.engine.block_manager import BlockManager
from internvl35.engine.sequence import ImageSpan, Sequence


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Sequence(list(range(10)))
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free == 7 and a.num_cached_tokens == 0
    b = Sequence(list(range(8)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert bm.num_free == 6
    bm.deallocate(a)
    assert bm.num_free == 7  # the two shared blocks are still held by b
    bm.deallocate(b)
    assert bm.num_free == 10
    c = Sequence(list(range(9)))  # freed blocks stay cached until reused
    bm.allocate(c)
    assert c.num_cached_tokens == 8


def test_same_ids_different_images_do_not_share():
    bm = BlockManager(num_blocks=10, block_size=4)
    ids = [1, 7, 7, 7, 7, 7, 7, 7, 7, 2]
    a = Sequence(ids, images=[ImageSpan(1, 8, b"image-a")])
    b = Sequence(ids, images=[ImageSpan(1, 8, b"image-b")])
    c = Sequence(ids, images=[ImageSpan(1, 8, b"image-a")])
    for s in (a, b, c):
        bm.allocate(s)
    assert b.num_cached_tokens == 0 and not set(a.block_table[:2]) & set(b.block_table[:2])
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]


def test_append_opens_and_seals_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = Sequence([5, 6, 7])
    bm.allocate(s)
    assert len(s.block_table) == 2
    s.token_ids.append(8)
    bm.append(s)  # fills block 1 -> sealed and findable
    assert len(s.block_table) == 2
    t = Sequence([5, 6, 7, 8, 9])
    bm.allocate(t)
    assert t.num_cached_tokens == 4
    s.token_ids.append(9)
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.block_table) == 3


def test_a_full_prefix_hit_still_computes_the_last_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Sequence(list(range(8)))
    bm.allocate(a)
    b = Sequence(list(range(8)))  # identical, every block full and cached
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]  # its logits need the last token computed


def test_can_append_matches_append():
    bm = BlockManager(num_blocks=2, block_size=2)
    s = Sequence([1, 2, 3])
    bm.allocate(s)
    assert bm.num_free == 0
    s.token_ids.append(4)  # fits the second block
    assert bm.can_append(s)
    bm.append(s)
    s.token_ids.append(5)  # needs a third block: none free
    assert not bm.can_append(s)


def test_blocks_freed_before_their_kv_was_computed_are_not_reused():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Sequence(list(range(10)))
    bm.allocate(a)  # a prefill put back for want of step budget: nothing computed
    bm.deallocate(a)
    bm.allocate(a)
    assert a.num_cached_tokens == 0
    a.num_computed = 10  # its prefill ran
    a.token_ids += [10, 11]
    bm.append(a)
    bm.append(a)  # block 2 sealed, though token 11 has not run yet
    bm.deallocate(a)  # preempted before that step
    b = Sequence(list(range(13)))
    bm.allocate(b)
    assert b.num_cached_tokens == 8  # blocks 0-1 hold computed K/V; block 2 does not
